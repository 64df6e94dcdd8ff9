//! Writing a batch of images as one PNG grid.

use std::path::Path;

use crate::data::{write_file_atomically, DataError};

/// Width in pixels of the gutter around and between grid cells.
pub const GUTTER: usize = 2;
/// Gray level of the gutter (and of unused cells), so that cells stay distinguishable on
/// black-background images such as MNIST.
pub const GUTTER_VALUE: u8 = 128;

/// Number of grid columns for `n` images: ceil(sqrt(n)).
pub fn grid_columns(n: usize) -> usize {
    let mut c = (n as f64).sqrt() as usize;
    while c * c < n {
        c += 1;
    }
    while c > 1 && (c - 1) * (c - 1) >= n {
        c -= 1;
    }
    c.max(1)
}

/// Write `n` images (each `channels`×`height`×`width`, channel-major; 1 channel = grayscale,
/// 3 = RGB) into one PNG laid out as a near-square grid (columns = ceil(sqrt(n))) with a
/// [`GUTTER`]-pixel gutter around and between the cells. The file is written to a temporary
/// file next to `path` and renamed into place.
pub fn write_png_grid(
    path: &Path,
    images: &[u8],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> Result<(), DataError> {
    let origin = path.display().to_string();
    if channels != 1 && channels != 3 {
        return Err(DataError::invalid(
            origin,
            format!("cannot write PNG grid: {channels} channels (expected 1 or 3)"),
        ));
    }
    if n == 0 || height == 0 || width == 0 {
        return Err(DataError::invalid(
            origin,
            format!("cannot write PNG grid of {n} images of {height}x{width}: nothing to draw"),
        ));
    }
    let per_image = channels
        .checked_mul(height)
        .and_then(|v| v.checked_mul(width));
    if per_image.and_then(|p| p.checked_mul(n)) != Some(images.len()) {
        return Err(DataError::invalid(
            origin,
            format!(
                "cannot write PNG grid: {n} images of {channels}x{height}x{width} need {} bytes, got {}",
                per_image
                    .and_then(|p| p.checked_mul(n))
                    .map_or_else(|| "too many".to_string(), |v| v.to_string()),
                images.len()
            ),
        ));
    }
    let per_image = height * width * channels;
    let cols = grid_columns(n);
    let rows = n.div_ceil(cols);
    let grid_w = cols * width + (cols + 1) * GUTTER;
    let grid_h = rows * height + (rows + 1) * GUTTER;
    let (Ok(w32), Ok(h32)) = (u32::try_from(grid_w), u32::try_from(grid_h)) else {
        return Err(DataError::invalid(
            origin,
            format!("PNG grid of {grid_w}x{grid_h} pixels is too large"),
        ));
    };
    let mut canvas = vec![GUTTER_VALUE; grid_w * grid_h * channels];
    for (k, img) in images.chunks_exact(per_image).enumerate() {
        let (gr, gc) = (k / cols, k % cols);
        let y0 = GUTTER + gr * (height + GUTTER);
        let x0 = GUTTER + gc * (width + GUTTER);
        for y in 0..height {
            for x in 0..width {
                let dst = ((y0 + y) * grid_w + x0 + x) * channels;
                for c in 0..channels {
                    canvas[dst + c] = img[(c * height + y) * width + x];
                }
            }
        }
    }

    write_png(path, &canvas, (w32, h32), channels)
}

/// Encode 8-bit pixels (`channels` 1 = grayscale, 3 = RGB, row-major) as PNG and write them
/// atomically.
pub fn write_png(
    path: &Path,
    pixels: &[u8],
    (width, height): (u32, u32),
    channels: usize,
) -> Result<(), DataError> {
    let mut bytes = Vec::new();
    let encoded = (|| -> Result<(), png::EncodingError> {
        let mut enc = png::Encoder::new(&mut bytes, width, height);
        enc.set_color(if channels == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(pixels)?;
        writer.finish()
    })();
    encoded.map_err(|e| {
        DataError::invalid(
            path.display().to_string(),
            format!("PNG encoding failed: {e}"),
        )
    })?;
    write_file_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_ceil_sqrt() {
        let got: Vec<usize> = [1, 2, 4, 5, 9, 10, 16, 17, 100, 101]
            .iter()
            .map(|&n| grid_columns(n))
            .collect();
        assert_eq!(got, vec![1, 2, 2, 3, 3, 4, 4, 5, 10, 11]);
    }

    #[test]
    fn bad_arguments_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("grid.png");
        for (imgs, n, c) in [(vec![0u8; 4], 1, 2), (vec![0u8; 3], 1, 1), (vec![], 0, 1)] {
            let msg = write_png_grid(&p, &imgs, n, c, 2, 2)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("grid.png"), "{msg}");
        }
        assert!(!p.exists());
    }

    #[test]
    fn missing_directories_are_created_and_a_file_in_the_way_is_an_error() {
        // Atomic writes create missing parent directories (`crate::atomic`).
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("no/such/dir/grid.png");
        write_png_grid(&p, &[0; 4], 1, 1, 2, 2).unwrap();
        assert!(p.is_file());
        // A file where a directory should be: an error naming it, and nothing written.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), b"x").unwrap();
        let p = d.path().join("file/grid.png");
        let msg = write_png_grid(&p, &[0; 4], 1, 1, 2, 2)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("file"), "{msg}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
