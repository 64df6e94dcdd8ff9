//! Data sets: MNIST IDX files (raw or gzip), the embedded 10k-digit MNIST subset, and
//! continuous data sets stored as `.npy` arrays, each split into train / validation / test.
//!
//! Every error names the file (or origin, for in-memory data) and what is wrong with it.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// Errors from loading or writing data files. Every message starts with the path or origin.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {context}: {source}")]
    Io {
        path: String,
        context: String,
        #[source]
        source: io::Error,
    },
    /// The contents of `origin` (a path or a description of in-memory data) are invalid.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl DataError {
    pub(crate) fn io(path: &Path, context: impl Into<String>, source: io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(origin: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Invalid {
            origin: origin.into(),
            message: message.into(),
        }
    }
}

/// IDX magic number of an unsigned-byte, 3-dimensional array (images).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic number of an unsigned-byte, 1-dimensional array (labels).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// A stack of 8-bit grayscale images, row-major: image `i` is
/// `pixels[i*rows*cols..(i+1)*rows*cols]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Decompress `bytes` if they start with the gzip magic bytes (1f 8b); otherwise return them as is.
fn maybe_gunzip<'a>(
    bytes: &'a [u8],
    origin: &str,
) -> Result<std::borrow::Cow<'a, [u8]>, DataError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| {
                DataError::invalid(origin, format!("gzip data is corrupt or truncated: {e}"))
            })?;
        Ok(std::borrow::Cow::Owned(out))
    } else {
        Ok(std::borrow::Cow::Borrowed(bytes))
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn describe_magic(magic: u32) -> String {
    match magic {
        IDX_IMAGES_MAGIC => format!("0x{magic:08x} (an IDX image file)"),
        IDX_LABELS_MAGIC => format!("0x{magic:08x} (an IDX label file)"),
        _ => format!("0x{magic:08x}"),
    }
}

/// Check the magic number and that the whole IDX header (magic + one u32 per dimension) is present.
fn check_idx_header(
    data: &[u8],
    origin: &str,
    expected_magic: u32,
    what: &str,
) -> Result<(), DataError> {
    let header_len = 4 + 4 * (expected_magic & 0xff) as usize;
    if data.is_empty() {
        return Err(DataError::invalid(
            origin,
            format!("file is empty (expected an IDX {what} file)"),
        ));
    }
    if data.len() < 4 {
        return Err(DataError::invalid(
            origin,
            format!(
                "file is {} bytes long, too short for an IDX header (expected an IDX {what} file)",
                data.len()
            ),
        ));
    }
    let magic = be_u32(data, 0);
    if magic != expected_magic {
        return Err(DataError::invalid(
            origin,
            format!(
                "wrong magic number {}; expected 0x{expected_magic:08x} (IDX {what})",
                describe_magic(magic)
            ),
        ));
    }
    if data.len() < header_len {
        return Err(DataError::invalid(
            origin,
            format!(
                "IDX {what} header is truncated: expected {header_len} header bytes, found {}",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// Parse an IDX image file (magic 0x00000803), gzip-compressed or raw. `origin` names the data
/// in error messages (usually the file path).
pub fn parse_idx_images(bytes: &[u8], origin: &str) -> Result<Images, DataError> {
    let data = maybe_gunzip(bytes, origin)?;
    check_idx_header(&data, origin, IDX_IMAGES_MAGIC, "images")?;
    let n = be_u32(&data, 4) as usize;
    let rows = be_u32(&data, 8) as usize;
    let cols = be_u32(&data, 12) as usize;
    if rows == 0 || cols == 0 {
        return Err(DataError::invalid(
            origin,
            format!("IDX image size is {rows}x{cols}; rows and columns must be positive"),
        ));
    }
    let expected = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| {
            DataError::invalid(
                origin,
                format!("IDX header claims {n} images of {rows}x{cols}, which is too large"),
            )
        })?;
    let body = &data[16..];
    if body.len() != expected {
        return Err(DataError::invalid(
            origin,
            format!(
                "expected {expected} pixel bytes after the header ({n} images of {rows}x{cols}), found {}",
                body.len()
            ),
        ));
    }
    Ok(Images {
        n,
        rows,
        cols,
        pixels: body.to_vec(),
    })
}

/// Parse an IDX label file (magic 0x00000801), gzip-compressed or raw.
pub fn parse_idx_labels(bytes: &[u8], origin: &str) -> Result<Vec<u8>, DataError> {
    let data = maybe_gunzip(bytes, origin)?;
    check_idx_header(&data, origin, IDX_LABELS_MAGIC, "labels")?;
    let n = be_u32(&data, 4) as usize;
    let body = &data[8..];
    if body.len() != n {
        return Err(DataError::invalid(
            origin,
            format!(
                "expected {n} label bytes after the header, found {}",
                body.len()
            ),
        ));
    }
    Ok(body.to_vec())
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    fs::read(path).map_err(|e| DataError::io(path, "cannot read file", e))
}

/// Read an IDX image file (gzip-compressed or raw, detected from the contents).
pub fn read_idx_images(path: &Path) -> Result<Images, DataError> {
    parse_idx_images(&read_file(path)?, &path.display().to_string())
}

/// Read an IDX label file (gzip-compressed or raw, detected from the contents).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    parse_idx_labels(&read_file(path)?, &path.display().to_string())
}

/// Row-major examples: example i is values[i*dim..(i+1)*dim].
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub n: usize,
    pub dim: usize,
    pub values: Vec<f32>,
}

impl Split {
    /// Example `i` (panics if `i >= n`, like slice indexing).
    pub fn example(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// The first `n` examples (all of them if `n >= self.n`).
    pub fn take(&self, n: usize) -> Split {
        let n = n.min(self.n);
        Split {
            n,
            dim: self.dim,
            values: self.values[..n * self.dim].to_vec(),
        }
    }

    /// Examples `start..end` of `values` (row-major, `dim` wide) as a split.
    fn from_rows<T: Copy + Into<f64>>(values: &[T], dim: usize, start: usize, end: usize) -> Split {
        Split {
            n: end - start,
            dim,
            values: values[start * dim..end * dim]
                .iter()
                .map(|&v| v.into() as f32)
                .collect(),
        }
    }
}

/// A data set with train / validation / test splits.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub dim: usize,
    /// image shape if images (channels, rows, cols)
    pub image_shape: Option<[usize; 3]>,
    /// true: values are 8-bit integers 0..=255 (dequantize+logit preprocessing applies)
    pub discrete: bool,
    pub train: Split,
    pub valid: Split,
    pub test: Split,
}

const EMBEDDED_MNIST_GZ: &[u8] =
    include_bytes!("../../../examples/data/mnist10k-images-idx3-ubyte.gz");
const EMBEDDED_ORIGIN: &str = "embedded MNIST (examples/data/mnist10k-images-idx3-ubyte.gz)";

/// The 10,000 MNIST digits shipped in the repository: train = first 8,000,
/// validation = next 1,000, test = last 1,000. Pixel values 0..=255 as f32.
pub fn embedded_mnist() -> Result<Dataset, DataError> {
    let images = parse_idx_images(EMBEDDED_MNIST_GZ, EMBEDDED_ORIGIN)?;
    if images.n != 10_000 || images.rows != 28 || images.cols != 28 {
        return Err(DataError::invalid(
            EMBEDDED_ORIGIN,
            format!(
                "expected 10000 images of 28x28, found {} of {}x{}",
                images.n, images.rows, images.cols
            ),
        ));
    }
    let dim = images.rows * images.cols;
    let p = &images.pixels;
    Ok(Dataset {
        name: "mnist-embedded".to_string(),
        dim,
        image_shape: Some([1, images.rows, images.cols]),
        discrete: true,
        train: Split::from_rows(p, dim, 0, 8_000),
        valid: Split::from_rows(p, dim, 8_000, 9_000),
        test: Split::from_rows(p, dim, 9_000, 10_000),
    })
}

/// Find the first existing file among `names` in `dir`, or an error listing what was looked for.
fn find_one(dir: &Path, names: &[&str], what: &str) -> Result<PathBuf, DataError> {
    for name in names {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(DataError::invalid(
        dir.display().to_string(),
        format!(
            "no MNIST {what} file found; looked for {}",
            names.join(", ")
        ),
    ))
}

/// Number of validation examples carved from the end of a training file of `n` images:
/// 10,000 for full MNIST, otherwise the last 1/6 (at least 1).
fn mnist_valid_count(n: usize) -> usize {
    if n >= 60_000 {
        10_000
    } else {
        (n / 6).max(1)
    }
}

/// Full MNIST from a directory in the standard file layout (`train-images-idx3-ubyte[.gz]`,
/// `t10k-images-idx3-ubyte[.gz]`, or the `train-images.idx3-ubyte` naming variant).
/// train = first 50,000 training images, validation = last 10,000, test = t10k.
/// For a training file with fewer than 60,000 images, validation = last 1/6 (at least 1).
pub fn load_mnist_dir(dir: &Path) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::invalid(
            dir.display().to_string(),
            "not a directory (expected a directory with MNIST IDX files)",
        ));
    }
    let train_path = find_one(
        dir,
        &[
            "train-images-idx3-ubyte",
            "train-images-idx3-ubyte.gz",
            "train-images.idx3-ubyte",
            "train-images.idx3-ubyte.gz",
        ],
        "training images",
    )?;
    let test_path = find_one(
        dir,
        &[
            "t10k-images-idx3-ubyte",
            "t10k-images-idx3-ubyte.gz",
            "t10k-images.idx3-ubyte",
            "t10k-images.idx3-ubyte.gz",
        ],
        "test images",
    )?;
    let train = read_idx_images(&train_path)?;
    let test = read_idx_images(&test_path)?;
    if train.n < 2 {
        return Err(DataError::invalid(
            train_path.display().to_string(),
            format!(
                "has {} images; need at least 2 (one for training, one for validation)",
                train.n
            ),
        ));
    }
    if test.n == 0 {
        return Err(DataError::invalid(
            test_path.display().to_string(),
            "has no images; need at least 1 test image",
        ));
    }
    if (test.rows, test.cols) != (train.rows, train.cols) {
        return Err(DataError::invalid(
            test_path.display().to_string(),
            format!(
                "test images are {}x{} but training images ({}) are {}x{}",
                test.rows,
                test.cols,
                train_path.display(),
                train.rows,
                train.cols
            ),
        ));
    }
    let dim = train.rows * train.cols;
    let n_valid = mnist_valid_count(train.n);
    let n_train = train.n - n_valid;
    Ok(Dataset {
        name: "mnist".to_string(),
        dim,
        image_shape: Some([1, train.rows, train.cols]),
        discrete: true,
        train: Split::from_rows(&train.pixels, dim, 0, n_train),
        valid: Split::from_rows(&train.pixels, dim, n_train, train.n),
        test: Split::from_rows(&test.pixels, dim, 0, test.n),
    })
}

/// Continuous data set from a `.npy` array of shape `[N, ...]` (float32/float64, or integers,
/// converted). dim = product of the trailing axes; splits 80% / 10% / 10% in file order, each
/// at least one example.
pub fn load_npy_dataset(path: &Path) -> Result<Dataset, DataError> {
    let origin = path.display().to_string();
    let (shape, values) = crate::npy::read_npy(path)?;
    let Some((&n, rest)) = shape.split_first() else {
        return Err(DataError::invalid(
            origin,
            "array is 0-dimensional; expected shape [N, ...] with one example per row",
        ));
    };
    let dim: usize = rest.iter().product();
    if dim == 0 {
        return Err(DataError::invalid(
            origin,
            format!("array shape {shape:?} has an empty example dimension"),
        ));
    }
    if n < 3 {
        return Err(DataError::invalid(
            origin,
            format!(
                "array has {n} examples (shape {shape:?}); need at least 3 for train/validation/test splits"
            ),
        ));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(DataError::invalid(
            origin,
            format!(
                "non-finite value {} at example {}, component {}",
                values[i],
                i / dim,
                i % dim
            ),
        ));
    }
    let n_valid = (n / 10).max(1);
    let n_test = (n / 10).max(1);
    let n_train = n - n_valid - n_test;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "npy".to_string());
    Ok(Dataset {
        name,
        dim,
        image_shape: None,
        discrete: false,
        train: Split::from_rows(&values, dim, 0, n_train),
        valid: Split::from_rows(&values, dim, n_train, n_train + n_valid),
        test: Split::from_rows(&values, dim, n_train + n_valid, n),
    })
}

/// One CIFAR-10 binary record: a label byte, then 3 × 32 × 32 pixel bytes (R, G, B planes,
/// each row-major): the `[C, H, W]` C order the flows use.
const CIFAR_RECORD: usize = 1 + CIFAR_DIM;
const CIFAR_DIM: usize = 3 * 32 * 32;

/// Whether `dir` holds CIFAR-10 in its binary format.
fn is_cifar_dir(dir: &Path) -> bool {
    dir.join("test_batch.bin").is_file() || dir.join("data_batch_1.bin").is_file()
}

/// The pixels of a CIFAR-10 binary file (labels dropped), checking its size.
fn read_cifar_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "cannot read", e))?;
    if bytes.is_empty() || bytes.len() % CIFAR_RECORD != 0 {
        return Err(DataError::invalid(
            path.display().to_string(),
            format!(
                "not a CIFAR-10 binary batch: {} bytes is not a positive multiple of the \
                 {CIFAR_RECORD}-byte record (a label byte and 3×32×32 pixels)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / CIFAR_RECORD;
    let mut pixels = Vec::with_capacity(n * CIFAR_DIM);
    for (i, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::invalid(
                path.display().to_string(),
                format!(
                    "record {i} has label {} (CIFAR-10 labels are 0..=9; is this CIFAR-100?)",
                    rec[0]
                ),
            ));
        }
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(pixels)
}

/// CIFAR-10 from its binary distribution: `data_batch_*.bin` (in name order) for training and
/// validation — the last 5,000 images validate when there are 50,000, else the last tenth (at
/// least one) — and `test_batch.bin` for testing.
pub fn load_cifar_dir(dir: &Path) -> Result<Dataset, DataError> {
    let origin = dir.display().to_string();
    let mut batches: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, "cannot list", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("data_batch_") && n.ends_with(".bin"))
        })
        .collect();
    batches.sort();
    if batches.is_empty() {
        return Err(DataError::invalid(
            origin,
            "no CIFAR-10 training batch (data_batch_1.bin … data_batch_5.bin) found",
        ));
    }
    let test_path = dir.join("test_batch.bin");
    if !test_path.is_file() {
        return Err(DataError::invalid(
            origin,
            "no CIFAR-10 test batch (test_batch.bin) found",
        ));
    }
    let mut train = Vec::new();
    for b in &batches {
        train.extend(read_cifar_file(b)?);
    }
    let test = read_cifar_file(&test_path)?;
    let n = train.len() / CIFAR_DIM;
    if n < 2 {
        return Err(DataError::invalid(
            origin,
            format!("{n} training image(s): need at least 2 for a training and a validation split"),
        ));
    }
    let n_valid = if n >= 50_000 { 5_000 } else { (n / 10).max(1) };
    let n_train = n - n_valid;
    Ok(Dataset {
        name: "cifar10".to_string(),
        dim: CIFAR_DIM,
        image_shape: Some([3, 32, 32]),
        discrete: true,
        train: Split::from_rows(&train, CIFAR_DIM, 0, n_train),
        valid: Split::from_rows(&train, CIFAR_DIM, n_train, n),
        test: Split::from_rows(&test, CIFAR_DIM, 0, test.len() / CIFAR_DIM),
    })
}

/// Load the data set named on the command line: `None` -> embedded MNIST; a directory -> full
/// MNIST in standard IDX files, or CIFAR-10 in its binary format (`data_batch_*.bin`,
/// `test_batch.bin`); a `.npy` file -> continuous data set.
pub fn load_data(arg: Option<&Path>) -> Result<Dataset, DataError> {
    let Some(path) = arg else {
        return embedded_mnist();
    };
    if path.is_dir() {
        if is_cifar_dir(path) {
            return load_cifar_dir(path);
        }
        return load_mnist_dir(path);
    }
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if !path.exists() {
        return Err(DataError::invalid(
            path.display().to_string(),
            "does not exist (expected a directory with MNIST IDX files or a .npy file)",
        ));
    }
    if is_npy {
        load_npy_dataset(path)
    } else {
        Err(DataError::invalid(
            path.display().to_string(),
            "unsupported data set: expected a directory with MNIST IDX files or a .npy file",
        ))
    }
}

/// [`crate::atomic::write_atomically`], with its error as a [`DataError`].
pub(crate) fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::atomic::write_atomically(path, bytes).map_err(|e| {
        let path = PathBuf::from(&e.path);
        DataError::io(&path, format!("cannot {}", e.step), e.source)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_images(n: u32, rows: u32, cols: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [IDX_IMAGES_MAGIC, n, rows, cols] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_raw_images() {
        let body: Vec<u8> = (0..12).collect();
        let imgs = parse_idx_images(&idx_images(3, 2, 2, &body), "mem").unwrap();
        assert_eq!((imgs.n, imgs.rows, imgs.cols), (3, 2, 2));
        assert_eq!(imgs.pixels, body);
    }

    #[test]
    fn truncated_body_is_reported_with_counts() {
        let err = parse_idx_images(&idx_images(3, 2, 2, &[0; 5]), "x.idx").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("x.idx: "), "{msg}");
        assert!(msg.contains("expected 12 pixel bytes"), "{msg}");
        assert!(msg.contains("found 5"), "{msg}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let err = parse_idx_images(&idx_images(1, 2, 2, &[0; 6]), "x.idx").unwrap_err();
        assert!(err.to_string().contains("found 6"), "{err}");
    }

    #[test]
    fn label_file_given_as_images_is_explained() {
        let mut v = IDX_LABELS_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&2u32.to_be_bytes());
        v.extend_from_slice(&[1, 2]);
        let msg = parse_idx_images(&v, "labels.idx").unwrap_err().to_string();
        assert!(msg.contains("label file"), "{msg}");
        assert_eq!(parse_idx_labels(&v, "labels.idx").unwrap(), vec![1, 2]);
    }

    #[test]
    fn short_header_and_huge_dims_are_errors() {
        let v = IDX_IMAGES_MAGIC.to_be_bytes();
        let msg = parse_idx_images(&v, "h").unwrap_err().to_string();
        assert!(msg.contains("header is truncated"), "{msg}");
        let v = idx_images(u32::MAX, u32::MAX, u32::MAX, &[]);
        assert!(parse_idx_images(&v, "h").is_err());
        let v = idx_images(1, 0, 5, &[]);
        assert!(parse_idx_images(&v, "h").is_err());
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let msg = parse_idx_images(&[0x1f, 0x8b, 8, 0, 1, 2], "bad.gz")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("bad.gz: gzip"), "{msg}");
    }

    #[test]
    fn split_take_and_example() {
        let s = Split {
            n: 3,
            dim: 2,
            values: vec![0., 1., 2., 3., 4., 5.],
        };
        assert_eq!(s.example(1), &[2., 3.]);
        let t = s.take(2);
        assert_eq!((t.n, t.values.len()), (2, 4));
        assert_eq!(s.take(10).n, 3);
    }

    #[test]
    fn mnist_valid_fraction() {
        assert_eq!(mnist_valid_count(60_000), 10_000);
        assert_eq!(mnist_valid_count(12), 2);
        assert_eq!(mnist_valid_count(5), 1);
        assert_eq!(mnist_valid_count(2), 1);
    }
}
