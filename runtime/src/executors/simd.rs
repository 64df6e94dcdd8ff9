//! Run-time choice of the widest vector instructions for the host's hot loops.

/// Calls the `#[inline(always)]` function `$body` on the `$val`s, compiled for AVX-512 or AVX2
/// when the CPU has them (detected at run time), else as compiled: the loops vectorize at the
/// widest width, and every path does the same IEEE operations in the same order.
/// `[$gp]` / `[$ga]`: the function's generic parameters and arguments.
macro_rules! call_on_widest_simd {
    ($body:ident [$($gp:tt)*] [$($ga:tt)*] ($($arg:ident: $ty:ty = $val:expr),* $(,)?) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl")]
            unsafe fn avx512<$($gp)*>($($arg: $ty),*) -> $ret {
                $body::<$($ga)*>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<$($gp)*>($($arg: $ty),*) -> $ret {
                $body::<$($ga)*>($($arg),*)
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { avx512::<$($ga)*>($($val),*) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { avx2::<$($ga)*>($($val),*) };
            }
        }
        $body::<$($ga)*>($($val),*)
    }};
}
pub(crate) use call_on_widest_simd;
