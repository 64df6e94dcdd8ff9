//! Reading and writing NumPy `.npy` arrays (C order) via the `npyz` crate.

use std::io;
use std::path::Path;

use npyz::{DType, Endianness, NpyFile, NpyHeader, Order, TypeChar, WriteOptions, WriterBuilder};

use crate::data::{write_file_atomically, DataError};

/// Element types `read_npy` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    U8,
    I32,
    I64,
}

impl Elem {
    fn bytes(self) -> usize {
        match self {
            Elem::U8 => 1,
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }
}

fn classify(dtype: &DType) -> Option<(Elem, bool)> {
    let DType::Plain(ts) = dtype else {
        return None;
    };
    let elem = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => Elem::F32,
        (TypeChar::Float, 8) => Elem::F64,
        (TypeChar::Uint, 1) => Elem::U8,
        (TypeChar::Int, 4) => Elem::I32,
        (TypeChar::Int, 8) => Elem::I64,
        _ => return None,
    };
    Some((elem, ts.endianness() == Endianness::Big))
}

/// The longest header accepted: numpy itself refuses headers over 10,000 bytes unless told
/// otherwise, and the plain dtypes read here need about a hundred.
const MAX_HEADER_BYTES: usize = 100_000;
/// The deepest bracket nesting accepted in a header (a plain dtype's header nests 2 deep),
/// so that the header parser's recursion stays shallow whatever the file holds.
const MAX_HEADER_NESTING: usize = 16;

/// Check the preamble (magic, version, header length) and the header's size and nesting
/// before the header parser sees it; returns where the data starts.
fn data_offset(bytes: &[u8], origin: &str) -> Result<usize, DataError> {
    let bad = |m: String| DataError::invalid(origin, format!("not a valid npy file: {m}"));
    if bytes.len() < 8 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(
            "it does not start with the npy magic bytes \\x93NUMPY".into()
        ));
    }
    let (len_bytes, major) = match (bytes[6], bytes[7]) {
        (1, 0) => (2, 1),
        (2, 0) | (3, 0) => (4, bytes[6]),
        (major, minor) => return Err(bad(format!("unsupported format version {major}.{minor}"))),
    };
    let start = 8 + len_bytes;
    let Some(len_field) = bytes.get(8..start) else {
        return Err(bad("the file ends inside its header".into()));
    };
    let header_len = if major == 1 {
        usize::from(u16::from_le_bytes([len_field[0], len_field[1]]))
    } else {
        u32::from_le_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]) as usize
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "its header claims {header_len} bytes (at most {MAX_HEADER_BYTES} are accepted)"
        )));
    }
    let Some(header) = bytes.get(start..start + header_len) else {
        return Err(bad(format!(
            "the file ends inside its header ({header_len} header bytes declared, {} present)",
            bytes.len() - start
        )));
    };
    // The header parser multiplies the shape's entries unchecked (all of them, for strides,
    // even past a zero): a shape whose non-zero entries overflow must not reach it.
    let text = String::from_utf8_lossy(header);
    let shapes = header_shapes(&text)
        .ok_or_else(|| bad("its header has no readable 'shape' tuple of integers".into()))?;
    for shape in shapes {
        let mut nonzero = shape.iter().filter(|&&d| d > 0);
        if nonzero.try_fold(1u64, |a, &d| a.checked_mul(d)).is_none() {
            return Err(DataError::invalid(
                origin,
                format!("array shape {shape:?} is too large"),
            ));
        }
    }
    let mut depth = 0usize;
    for &b in header {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_HEADER_NESTING {
                    return Err(bad("its header nests brackets too deeply".into()));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(start + header_len)
}

/// Every `'shape': (a, b, ...)` entry of a header's dict literal, as numpy writes it (a dict
/// literal may repeat a key; the parser keeps the last); `None` if there is none or one is not
/// a tuple of integers.
fn header_shapes(header: &str) -> Option<Vec<Vec<u64>>> {
    let mut shapes = Vec::new();
    for key in ["'shape'", "\"shape\""] {
        for (at, _) in header.match_indices(key) {
            let rest = header[at + key.len()..].trim_start();
            let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('(')?;
            let inner = &rest[..rest.find(')')?];
            let shape = inner
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| d.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()?;
            shapes.push(shape);
        }
    }
    (!shapes.is_empty()).then_some(shapes)
}

/// Row-major multi-index of flat index `i` in `shape`, for error messages.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[k] = i % d;
            i /= d;
        }
    }
    index
}

/// Decode `count` little- or big-endian elements.
fn decode(body: &[u8], elem: Elem, big: bool) -> Vec<f64> {
    macro_rules! each {
        ($t:ty, $n:expr, $conv:expr) => {
            body.chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    let v = if big {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    };
                    $conv(v)
                })
                .collect()
        };
    }
    match elem {
        Elem::U8 => body.iter().map(|&v| f64::from(v)).collect(),
        Elem::F32 => each!(f32, 4, f64::from),
        Elem::F64 => each!(f64, 8, |v| v),
        Elem::I32 => each!(i32, 4, f64::from),
        // Beyond 2^53 an int64 loses precision as f64 (documented on `read_npy`).
        Elem::I64 => each!(i64, 8, |v| v as f64),
    }
}

/// Read a `.npy` array of float32, float64, uint8, int32 or int64 (C order, either byte order)
/// as its shape and its values converted to f64 (int64 values beyond 2^53 lose precision).
/// Every value must be finite: the arrays snfc reads are data or noise for a flow, where a
/// NaN or an infinity is always a mistake, reported here with its index.
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "cannot read npy file", e))?;
    parse_npy(&bytes, &path.display().to_string())
}

/// [`read_npy`] of a file's bytes; `origin` names the file in errors. The header's shape is
/// checked against the file's length before anything is allocated for the values.
pub fn parse_npy(bytes: &[u8], origin: &str) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let data_start = data_offset(bytes, origin)?;
    let header: NpyHeader = NpyFile::new(bytes)
        .map_err(|e| {
            // The header parser's errors run over several lines (a caret diagram): keep the first.
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default().trim();
            DataError::invalid(
                origin,
                format!("not a valid npy file (bad header): {first}"),
            )
        })?
        .header()
        .clone();
    if header.order() == Order::Fortran {
        return Err(DataError::invalid(
            origin,
            "array is stored in Fortran order; only C order is supported (save it with np.ascontiguousarray)",
        ));
    }
    let dtype = header.dtype();
    let Some((elem, big)) = classify(&dtype) else {
        return Err(DataError::invalid(
            origin,
            format!(
                "unsupported dtype {}; expected float32, float64, uint8, int32 or int64",
                dtype.descr()
            ),
        ));
    };
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| DataError::invalid(origin, "array shape does not fit in memory"))?;
    let size = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|count| count.checked_mul(elem.bytes()))
        .ok_or_else(|| DataError::invalid(origin, format!("array shape {shape:?} is too large")))?;
    let body = &bytes[data_start..];
    if body.len() < size {
        return Err(DataError::invalid(
            origin,
            format!(
                "npy data is truncated: its header's shape {shape:?} needs {size} bytes of data, the file has {}",
                body.len()
            ),
        ));
    }
    if body.len() > size {
        return Err(DataError::invalid(
            origin,
            format!(
                "{} bytes follow the {size} bytes of data that its header's shape {shape:?} describes (a wrong shape, or a corrupt file?)",
                body.len() - size
            ),
        ));
    }
    let values = decode(body, elem, big);
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(DataError::invalid(
            origin,
            format!(
                "non-finite value {} at index {:?}",
                values[i],
                unravel(i, &shape)
            ),
        ));
    }
    Ok((shape, values))
}

fn write_npy<T>(path: &Path, shape: &[usize], data: &[T]) -> Result<(), DataError>
where
    T: npyz::AutoSerialize + Copy,
{
    let origin = path.display().to_string();
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count != Some(data.len()) {
        return Err(DataError::invalid(
            origin,
            format!(
                "cannot write npy: shape {shape:?} does not match {} values",
                data.len()
            ),
        ));
    }
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut bytes = Vec::new();
    let result = (|| -> io::Result<()> {
        let mut writer = WriteOptions::<T>::new()
            .default_dtype()
            .shape(&shape64)
            .writer(&mut bytes)
            .begin_nd()?;
        writer.extend(data.iter().copied())?;
        writer.finish()
    })();
    result.map_err(|e| DataError::io(path, "cannot encode npy data", e))?;
    write_file_atomically(path, &bytes)
}

/// Write a C-order float32 `.npy` array (atomically: temporary file + rename).
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), DataError> {
    write_npy(path, shape, data)
}

/// Write a C-order float64 `.npy` array (atomically: temporary file + rename).
pub fn write_npy_f64(path: &Path, shape: &[usize], data: &[f64]) -> Result<(), DataError> {
    write_npy(path, shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1.0 npy file with a hand-written header.
    fn npy_bytes(descr: &str, fortran: bool, shape: &str, body: &[u8]) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(body);
        v
    }

    fn write_tmp(name: &str, bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        (dir, p)
    }

    #[test]
    fn reads_integer_dtypes() {
        let body: Vec<u8> = [-3i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let (_d, p) = write_tmp("a.npy", &npy_bytes("<i4", false, "(2,)", &body));
        assert_eq!(read_npy(&p).unwrap(), (vec![2], vec![-3.0, 7.0]));

        let body: Vec<u8> = [-(1i64 << 40), 5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let (_d, p) = write_tmp("b.npy", &npy_bytes("<i8", false, "(1, 2)", &body));
        assert_eq!(
            read_npy(&p).unwrap(),
            (vec![1, 2], vec![-(2f64.powi(40)), 5.0])
        );

        let (_d, p) = write_tmp("c.npy", &npy_bytes("|u1", false, "(3,)", &[0, 128, 255]));
        assert_eq!(read_npy(&p).unwrap().1, vec![0.0, 128.0, 255.0]);
    }

    #[test]
    fn rejects_fortran_order_and_other_dtypes() {
        let (_d, p) = write_tmp("f.npy", &npy_bytes("<f8", true, "(1, 1)", &[0; 8]));
        let msg = read_npy(&p).unwrap_err().to_string();
        assert!(msg.contains("f.npy") && msg.contains("Fortran"), "{msg}");

        let (_d, p) = write_tmp("h.npy", &npy_bytes("<i2", false, "(1,)", &[0; 2]));
        let msg = read_npy(&p).unwrap_err().to_string();
        assert!(
            msg.contains("h.npy") && msg.contains("unsupported dtype"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let (_d, p) = write_tmp("t.npy", &npy_bytes("<f4", false, "(4,)", &[0; 7]));
        let msg = read_npy(&p).unwrap_err().to_string();
        assert!(msg.contains("t.npy") && msg.contains("truncated"), "{msg}");

        let (_d, p) = write_tmp("g.npy", b"hello world");
        let msg = read_npy(&p).unwrap_err().to_string();
        assert!(
            msg.contains("g.npy") && msg.contains("not a valid npy"),
            "{msg}"
        );
    }

    #[test]
    fn big_endian_values_are_read_in_their_byte_order() {
        let body: Vec<u8> = [1.5f64, -2.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let b = npy_bytes(">f8", false, "(2,)", &body);
        assert_eq!(parse_npy(&b, "be").unwrap(), (vec![2], vec![1.5, -2.0]));
    }

    #[test]
    fn sizes_are_checked_before_anything_is_allocated() {
        // Overflowing shapes (also past a zero, where the header parser would overflow its
        // strides), a huge shape over a short body, and bytes beyond the data.
        for shape in [
            "(4294967296, 4294967296, 4294967296)",
            "(0, 4294967296, 4294967296)",
        ] {
            let msg = parse_npy(&npy_bytes("<f8", false, shape, &[]), "o.npy")
                .unwrap_err()
                .to_string();
            assert!(
                msg.starts_with("o.npy: ") && msg.contains("too large"),
                "{msg}"
            );
        }
        let msg = parse_npy(
            &npy_bytes("<f8", false, "(1099511627776, 784)", &[0; 16]),
            "h",
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("truncated") && msg.contains("the file has 16"),
            "{msg}"
        );
        let msg = parse_npy(&npy_bytes("|u1", false, "(2,)", &[1, 2, 3]), "t")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("1 bytes follow the 2 bytes"), "{msg}");
        // A header length beyond the file, and one beyond any sensible header.
        let mut b = npy_bytes("<f8", false, "(1,)", &[0; 8]);
        b[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(parse_npy(&b, "l")
            .unwrap_err()
            .to_string()
            .contains("ends inside its header"));
        let mut b = b"\x93NUMPY\x02\x00".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_npy(&b, "l")
            .unwrap_err()
            .to_string()
            .contains("4294967295"));
    }

    #[test]
    fn every_shape_of_a_header_is_checked() {
        // A repeated key: the header parser keeps the last one, so all of them are checked.
        let b = npy_bytes(
            "<f8",
            false,
            "(1,), 'shape': (4294967296, 4294967296, 4294967296)",
            &[],
        );
        let msg = parse_npy(&b, "d.npy").unwrap_err().to_string();
        assert!(msg.contains("too large"), "{msg}");
    }

    #[test]
    fn deeply_nested_and_shapeless_headers_are_refused() {
        let nested = format!(
            "{{'descr': {}'<f8'{}, 'shape': (1,)}}",
            "[".repeat(500),
            "]".repeat(500)
        );
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(nested.len() as u16).to_le_bytes());
        b.extend_from_slice(nested.as_bytes());
        let msg = parse_npy(&b, "n").unwrap_err().to_string();
        assert!(msg.contains("nests brackets too deeply"), "{msg}");
        let b = npy_bytes("<f8", false, "[1]", &[0; 8]);
        let msg = parse_npy(&b, "s").unwrap_err().to_string();
        assert!(msg.contains("'shape'"), "{msg}");
    }

    #[test]
    fn non_finite_values_are_named_by_index() {
        let body: Vec<u8> = [0.0, 1.0, 2.0, f64::NEG_INFINITY, 4.0, 5.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let msg = parse_npy(&npy_bytes("<f8", false, "(2, 3)", &body), "x.npy")
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "x.npy: non-finite value -inf at index [1, 0]");
    }

    #[test]
    fn write_rejects_shape_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.npy");
        let msg = write_npy_f32(&p, &[2, 2], &[1.0; 3])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("x.npy") && msg.contains("does not match"),
            "{msg}"
        );
        assert!(!p.exists());
    }
}
