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
    /// An I/O operation on `path` failed. The I/O error is part of the message, not a
    /// `source`: error reporters that print the chain would print it twice.
    #[error("{path}: {context}: {error}")]
    Io {
        path: String,
        context: String,
        error: io::Error,
    },
    /// The contents of `origin` (a path or a description of in-memory data) are invalid.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl DataError {
    pub(crate) fn io(path: &Path, context: impl Into<String>, error: io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            context: context.into(),
            error,
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

/// An IDX file's contents: decompressed if they were gzip-compressed.
struct Idx<'a> {
    data: std::borrow::Cow<'a, [u8]>,
    /// Decompression stopped one byte past the size the header declares: the file holds more.
    cut: bool,
}

/// The size of the body an IDX header of `magic` declares (the product of its dimensions),
/// when `head` holds the whole header with that magic; `None` otherwise (or on overflow).
fn declared_body(head: &[u8], magic: u32) -> Option<usize> {
    let dims = (magic & 0xff) as usize;
    if head.len() < 4 + 4 * dims || be_u32(head, 0) != magic {
        return None;
    }
    (0..dims).try_fold(1usize, |acc, k| {
        acc.checked_mul(be_u32(head, 4 + 4 * k) as usize)
    })
}

/// Decompress `bytes` if they start with the gzip magic bytes (1f 8b); otherwise return them as
/// is. Decompression stops one byte past what the header (of `magic`) declares, so a corrupt
/// or hostile stream cannot make it allocate more than the file claims to hold.
fn maybe_gunzip<'a>(bytes: &'a [u8], origin: &str, magic: u32) -> Result<Idx<'a>, DataError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(Idx {
            data: std::borrow::Cow::Borrowed(bytes),
            cut: false,
        });
    }
    let corrupt = |e: io::Error| {
        DataError::invalid(origin, format!("gzip data is corrupt or truncated: {e}"))
    };
    let header_len = 4 + 4 * (magic & 0xff) as u64;
    let mut decoder = MultiGzDecoder::new(bytes);
    let mut out = Vec::new();
    (&mut decoder)
        .take(header_len)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    // A header that is short or of another kind is reported by the caller; nothing after it
    // is needed for that.
    let body = declared_body(&out, magic).unwrap_or(0);
    let limit = (body as u64).saturating_add(1);
    (&mut decoder)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    let cut = out.len() as u64 == header_len + limit;
    Ok(Idx {
        data: std::borrow::Cow::Owned(out),
        cut,
    })
}

/// "found N" for a body of `len` bytes, or "found more" when decompression stopped early.
fn found(len: usize, cut: bool) -> String {
    if cut {
        format!("found more than {}", len - 1)
    } else {
        format!("found {len}")
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
    let Idx { data, cut } = maybe_gunzip(bytes, origin, IDX_IMAGES_MAGIC)?;
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
                "expected {expected} pixel bytes after the header ({n} images of {rows}x{cols}), {}",
                found(body.len(), cut)
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
    let Idx { data, cut } = maybe_gunzip(bytes, origin, IDX_LABELS_MAGIC)?;
    check_idx_header(&data, origin, IDX_LABELS_MAGIC, "labels")?;
    let n = be_u32(&data, 4) as usize;
    let body = &data[8..];
    if body.len() != n {
        return Err(DataError::invalid(
            origin,
            format!(
                "expected {n} label bytes after the header, {}",
                found(body.len(), cut)
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
fn find_one<S: AsRef<str>>(dir: &Path, names: &[S], what: &str) -> Result<PathBuf, DataError> {
    for name in names {
        let p = dir.join(name.as_ref());
        if p.is_file() {
            return Ok(p);
        }
    }
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
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
/// The labels are not used, but label files next to the images must count as many labels as
/// there are images (a mismatch means files of different data sets, or a broken download).
pub fn load_mnist_dir(dir: &Path) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::invalid(
            dir.display().to_string(),
            "not a directory (expected a directory with MNIST IDX files)",
        ));
    }
    let train_path = find_one(
        dir,
        &mnist_names("train", "images", "idx3"),
        "training images",
    )?;
    let test_path = find_one(dir, &mnist_names("t10k", "images", "idx3"), "test images")?;
    let labels = |prefix: &str| -> Result<Option<(Vec<u8>, String)>, DataError> {
        match find_one(dir, &mnist_names(prefix, "labels", "idx1"), "labels") {
            Ok(p) => Ok(Some((read_file(&p)?, p.display().to_string()))),
            Err(_) => Ok(None),
        }
    };
    let (train_labels, test_labels) = (labels("train")?, labels("t10k")?);
    let (train, test) = (read_file(&train_path)?, read_file(&test_path)?);
    let (train_origin, test_origin) = (
        train_path.display().to_string(),
        test_path.display().to_string(),
    );
    fn file(l: &Option<(Vec<u8>, String)>) -> Option<IdxFile<'_>> {
        l.as_ref().map(|(bytes, origin)| IdxFile { bytes, origin })
    }
    mnist_from_files(&MnistFiles {
        train_images: IdxFile {
            bytes: &train,
            origin: &train_origin,
        },
        test_images: IdxFile {
            bytes: &test,
            origin: &test_origin,
        },
        train_labels: file(&train_labels),
        test_labels: file(&test_labels),
    })
}

/// The four spellings of an MNIST file name: `{prefix}-{what}-{idx}-ubyte` and
/// `{prefix}-{what}.{idx}-ubyte`, each raw or `.gz`.
fn mnist_names(prefix: &str, what: &str, idx: &str) -> [String; 4] {
    [
        format!("{prefix}-{what}-{idx}-ubyte"),
        format!("{prefix}-{what}-{idx}-ubyte.gz"),
        format!("{prefix}-{what}.{idx}-ubyte"),
        format!("{prefix}-{what}.{idx}-ubyte.gz"),
    ]
}

/// The bytes of one IDX file and the name errors give it.
#[derive(Debug, Clone, Copy)]
pub struct IdxFile<'a> {
    pub bytes: &'a [u8],
    pub origin: &'a str,
}

/// The files of an MNIST directory, read.
#[derive(Debug, Clone, Copy)]
pub struct MnistFiles<'a> {
    pub train_images: IdxFile<'a>,
    pub test_images: IdxFile<'a>,
    pub train_labels: Option<IdxFile<'a>>,
    pub test_labels: Option<IdxFile<'a>>,
}

/// [`load_mnist_dir`] of files already read.
pub fn mnist_from_files(files: &MnistFiles) -> Result<Dataset, DataError> {
    let train = parse_idx_images(files.train_images.bytes, files.train_images.origin)?;
    let test = parse_idx_images(files.test_images.bytes, files.test_images.origin)?;
    for (labels, images, file) in [
        (files.train_labels, &train, files.train_images),
        (files.test_labels, &test, files.test_images),
    ] {
        let Some(l) = labels else { continue };
        let n = parse_idx_labels(l.bytes, l.origin)?.len();
        if n != images.n {
            return Err(DataError::invalid(
                l.origin,
                format!(
                    "has {n} labels, but {} has {} images (files of different data sets?)",
                    file.origin, images.n
                ),
            ));
        }
    }
    let train_origin = files.train_images.origin;
    if train.n < 2 {
        return Err(DataError::invalid(
            train_origin,
            format!(
                "has {} images; need at least 2 (one for training, one for validation)",
                train.n
            ),
        ));
    }
    if test.n == 0 {
        return Err(DataError::invalid(
            files.test_images.origin,
            "has no images; need at least 1 test image",
        ));
    }
    if (test.rows, test.cols) != (train.rows, train.cols) {
        return Err(DataError::invalid(
            files.test_images.origin,
            format!(
                "test images are {}x{} but training images ({train_origin}) are {}x{}",
                test.rows, test.cols, train.rows, train.cols
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

/// The position of the first value that is not 8-bit data (an integer 0..=255), if any: a
/// `.npy` array is 8-bit data (`Dataset::discrete`) when there is none, whatever its dtype
/// (`uint8`, or floats holding such integers).
pub fn first_non_eight_bit(values: &[f32]) -> Option<usize> {
    values
        .iter()
        .position(|v| !(v.fract() == 0.0 && (0.0..=255.0).contains(v)))
}

/// Data set from a `.npy` array of shape `[N, ...]` (float32/float64, or integers,
/// converted): 8-bit data when every value is an integer 0..=255 ([`first_non_eight_bit`]),
/// else continuous. dim = product of the trailing axes; splits 80% / 10% / 10% in file order,
/// each at least one example.
pub fn load_npy_dataset(path: &Path) -> Result<Dataset, DataError> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, "cannot read npy file", e))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "npy".to_string());
    npy_dataset(&bytes, &path.display().to_string(), &name)
}

/// [`load_npy_dataset`] of a file's bytes; `origin` names the file in errors, `name` the data
/// set.
pub fn npy_dataset(bytes: &[u8], origin: &str, name: &str) -> Result<Dataset, DataError> {
    let all = npy_examples(bytes, origin)?;
    let n = all.n;
    if n < 3 {
        return Err(DataError::invalid(
            origin,
            format!("array has {n} examples; need at least 3 for train/validation/test splits"),
        ));
    }
    let n_valid = (n / 10).max(1);
    let n_test = (n / 10).max(1);
    let n_train = n - n_valid - n_test;
    let dim = all.dim;
    Ok(Dataset {
        name: name.to_string(),
        dim,
        image_shape: None,
        discrete: first_non_eight_bit(&all.values).is_none(),
        train: Split::from_rows(&all.values, dim, 0, n_train),
        valid: Split::from_rows(&all.values, dim, n_train, n_train + n_valid),
        test: Split::from_rows(&all.values, dim, n_train + n_valid, n),
    })
}

/// Every example of a `.npy` array of shape `[N, ...]` (N ≥ 1) as one split: what `snfc eval
/// --data FILE.npy` evaluates (no train/validation/test split, so any N ≥ 1 will do).
pub fn load_npy_examples(path: &Path) -> Result<Split, DataError> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, "cannot read npy file", e))?;
    npy_examples(&bytes, &path.display().to_string())
}

/// [`load_npy_examples`] of a file's bytes; `origin` names the file in errors.
pub fn npy_examples(bytes: &[u8], origin: &str) -> Result<Split, DataError> {
    let (shape, values) = crate::npy::parse_npy(bytes, origin)?;
    let Some((&n, rest)) = shape.split_first() else {
        return Err(DataError::invalid(
            origin,
            "array is 0-dimensional; expected shape [N, ...] with one example per row",
        ));
    };
    // With N = 0 the trailing axes are not bounded by the file's size: multiply with care.
    let dim = rest
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| DataError::invalid(origin, format!("array shape {shape:?} is too large")))?;
    if dim == 0 {
        return Err(DataError::invalid(
            origin,
            format!("array shape {shape:?} has an empty example dimension"),
        ));
    }
    if n == 0 {
        return Err(DataError::invalid(
            origin,
            format!("array has no examples (shape {shape:?})"),
        ));
    }
    // Examples are kept in f32: a finite f64 beyond its range would become infinite.
    if let Some(i) = values.iter().position(|&v| !(v as f32).is_finite()) {
        return Err(DataError::invalid(
            origin,
            format!(
                "value {:?} at example {}, component {} is beyond the range of float32",
                values[i],
                i / dim,
                i % dim
            ),
        ));
    }
    Ok(Split::from_rows(&values, dim, 0, n))
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
    parse_cifar_batch(&bytes, &path.display().to_string())
}

/// The pixels of a CIFAR-10 binary batch's bytes (labels dropped), checking its size and
/// labels; `origin` names the file in errors.
pub fn parse_cifar_batch(bytes: &[u8], origin: &str) -> Result<Vec<u8>, DataError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD) {
        return Err(DataError::invalid(
            origin,
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
                origin,
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
    // The paper's recipe: the first 40,000 images train, the last 10,000 validate.
    let n_valid = if n >= 50_000 { 10_000 } else { (n / 10).max(1) };
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
/// What `--data` takes, for errors.
const DATA_FORMATS: &str = "a directory with MNIST IDX files (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz]), a directory with CIFAR-10 binary batches (data_batch_1.bin … data_batch_5.bin, test_batch.bin), or a .npy file";

pub fn load_data(arg: Option<&Path>) -> Result<Dataset, DataError> {
    let Some(path) = arg else {
        return embedded_mnist();
    };
    if path.is_dir() {
        if is_cifar_dir(path) {
            return load_cifar_dir(path);
        }
        return load_mnist_dir(path).map_err(|e| match e {
            // A directory with neither: say what else it could have held.
            DataError::Invalid { origin, message }
                if message.starts_with("no MNIST training images") =>
            {
                DataError::Invalid {
                    origin,
                    message: format!("{message}; --data takes {DATA_FORMATS}"),
                }
            }
            other => other,
        });
    }
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if !path.exists() {
        return Err(DataError::invalid(
            path.display().to_string(),
            format!("does not exist (expected {DATA_FORMATS})"),
        ));
    }
    if is_npy {
        load_npy_dataset(path)
    } else {
        Err(DataError::invalid(
            path.display().to_string(),
            format!("unsupported data set: expected {DATA_FORMATS}"),
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
    fn gzip_stops_at_the_declared_size() {
        use std::io::Write;
        let gz = |b: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(b).unwrap();
            e.finish().unwrap()
        };
        // 1 MB of pixels behind a header that declares one 2x2 image: not all decompressed.
        let file = gz(&idx_images(1, 2, 2, &vec![0; 1 << 20]));
        let msg = parse_idx_images(&file, "big.gz").unwrap_err().to_string();
        assert!(msg.contains("found more than 4"), "{msg}");
        let file = gz(&idx_images(2, 2, 2, &[5; 8]));
        assert_eq!(parse_idx_images(&file, "ok.gz").unwrap().pixels, vec![5; 8]);
    }

    #[test]
    fn label_files_must_count_the_images() {
        let train = idx_images(6, 2, 2, &[0; 24]);
        let test = idx_images(1, 2, 2, &[0; 4]);
        let mut labels = IDX_LABELS_MAGIC.to_be_bytes().to_vec();
        labels.extend_from_slice(&5u32.to_be_bytes());
        labels.extend_from_slice(&[1; 5]);
        let f = |bytes, origin| IdxFile { bytes, origin };
        let files = MnistFiles {
            train_images: f(&train, "train-images"),
            test_images: f(&test, "t10k-images"),
            train_labels: Some(f(&labels, "train-labels")),
            test_labels: None,
        };
        let msg = mnist_from_files(&files).unwrap_err().to_string();
        assert_eq!(
            msg,
            "train-labels: has 5 labels, but train-images has 6 images (files of different data sets?)"
        );
        let ds = mnist_from_files(&MnistFiles {
            train_labels: None,
            ..files
        })
        .unwrap();
        assert_eq!((ds.train.n, ds.valid.n, ds.test.n), (5, 1, 1));
    }

    #[test]
    fn npy_examples_take_any_count_and_check_f32_range() {
        let npy = |shape: &str, vals: &[f64]| {
            let mut h = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
            while !(10 + h.len() + 1).is_multiple_of(64) {
                h.push(' ');
            }
            h.push('\n');
            let mut v = b"\x93NUMPY\x01\x00".to_vec();
            v.extend_from_slice(&(h.len() as u16).to_le_bytes());
            v.extend_from_slice(h.as_bytes());
            v.extend(vals.iter().flat_map(|x| x.to_le_bytes()));
            v
        };
        let one = npy_examples(&npy("(1, 2)", &[0.5, 1.5]), "one.npy").unwrap();
        assert_eq!((one.n, one.dim, one.values), (1, 2, vec![0.5, 1.5]));
        let msg = npy_dataset(&npy("(1, 2)", &[0.5, 1.5]), "one.npy", "one")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("at least 3"), "{msg}");
        let msg = npy_examples(&npy("(2, 2)", &[0.5, 1.5, 1e300, 0.0]), "r.npy")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("example 1, component 0") && msg.contains("float32"),
            "{msg}"
        );
        let msg = npy_examples(&npy("(0, 3)", &[]), "e.npy")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no examples"), "{msg}");
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
