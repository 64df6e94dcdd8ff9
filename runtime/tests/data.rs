//! Data loading, npy and PNG tests against real files in temporary directories.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use snfc_runtime::data::{
    embedded_mnist, load_data, load_mnist_dir, load_npy_dataset, read_idx_images, read_idx_labels,
};
use snfc_runtime::image::write_png_grid;
use snfc_runtime::npy::{read_npy, write_npy_f32, write_npy_f64};

fn raw_embedded_idx() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/data/mnist10k-images-idx3-ubyte.gz");
    let gz = fs::read(&path).expect("read embedded gz");
    let mut raw = Vec::new();
    GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .expect("gunzip");
    raw
}

#[test]
fn embedded_mnist_loads_with_splits() {
    let ds = embedded_mnist().expect("embedded");
    assert_eq!(ds.dim, 784);
    assert_eq!(ds.image_shape, Some([1, 28, 28]));
    assert!(ds.discrete);
    assert_eq!((ds.train.n, ds.valid.n, ds.test.n), (8000, 1000, 1000));
    for s in [&ds.train, &ds.valid, &ds.test] {
        assert_eq!(s.dim, 784);
        assert_eq!(s.values.len(), s.n * 784);
        assert!(s
            .values
            .iter()
            .all(|&v| (0.0..=255.0).contains(&v) && v.fract() == 0.0));
    }

    // Independent check against the raw file: header, first image, split boundaries, last image.
    let raw = raw_embedded_idx();
    assert_eq!(&raw[..4], &[0, 0, 8, 3]);
    let px = &raw[16..];
    let sum_raw: u64 = px[..784].iter().map(|&b| u64::from(b)).sum();
    let sum_loaded: f64 = ds.train.example(0).iter().map(|&v| f64::from(v)).sum();
    assert!(sum_raw > 0);
    assert_eq!(sum_loaded, sum_raw as f64);
    let as_f32 = |i: usize| -> Vec<f32> {
        px[i * 784..(i + 1) * 784]
            .iter()
            .map(|&b| f32::from(b))
            .collect()
    };
    assert_eq!(ds.train.example(7999), &as_f32(7999)[..]);
    assert_eq!(ds.valid.example(0), &as_f32(8000)[..]);
    assert_eq!(ds.test.example(0), &as_f32(9000)[..]);
    assert_eq!(ds.test.example(999), &as_f32(9999)[..]);

    // load_data(None) is the embedded set.
    let d2 = load_data(None).expect("load_data(None)");
    assert_eq!(d2.test.values, ds.test.values);
}

fn idx_images(n: usize, rows: usize, cols: usize, seed: u8) -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..n * rows * cols)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut v = Vec::new();
    for x in [0x0803u32, n as u32, rows as u32, cols as u32] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend_from_slice(&pixels);
    (v, pixels)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn raw_and_gzipped_idx_give_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, pixels) = idx_images(4, 3, 5, 7);
    let raw_path = dir.path().join("images.gz"); // misleading name: detection is by content
    let gz_path = dir.path().join("images.idx");
    fs::write(&raw_path, &raw).unwrap();
    fs::write(&gz_path, gzip(&raw)).unwrap();
    let a = read_idx_images(&raw_path).unwrap();
    let b = read_idx_images(&gz_path).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.n, a.rows, a.cols), (4, 3, 5));
    assert_eq!(a.pixels, pixels);

    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 3];
    labels.extend_from_slice(&[4, 2, 9]);
    let lp = dir.path().join("labels");
    fs::write(&lp, gzip(&labels)).unwrap();
    assert_eq!(read_idx_labels(&lp).unwrap(), vec![4, 2, 9]);
}

fn expect_err_naming(path: &Path, result: Result<impl std::fmt::Debug, impl ToString>, what: &str) {
    let msg = match result {
        Ok(v) => panic!("expected an error for {}, got {v:?}", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file: {msg}"
    );
    assert!(msg.contains(what), "message does not say {what:?}: {msg}");
}

#[test]
fn broken_idx_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = idx_images(4, 3, 5, 0);

    let p = dir.path().join("truncated-idx3-ubyte");
    fs::write(&p, &raw[..raw.len() - 10]).unwrap();
    expect_err_naming(&p, read_idx_images(&p), "expected 60 pixel bytes");

    let p = dir.path().join("truncated.gz");
    fs::write(&p, gzip(&raw[..20])).unwrap();
    expect_err_naming(&p, read_idx_images(&p), "found 4");

    let p = dir.path().join("badmagic");
    let mut bad = raw.clone();
    bad[3] = 0x04;
    fs::write(&p, &bad).unwrap();
    expect_err_naming(&p, read_idx_images(&p), "magic");

    let p = dir.path().join("empty");
    fs::write(&p, b"").unwrap();
    expect_err_naming(&p, read_idx_images(&p), "empty");
    expect_err_naming(&p, read_idx_labels(&p), "empty");

    let p = dir.path().join("does-not-exist");
    expect_err_naming(&p, read_idx_images(&p), "cannot read");
}

fn write_mnist_dir(dir: &Path, n_train: usize, n_test: usize) -> (Vec<u8>, Vec<u8>) {
    let (train, train_px) = idx_images(n_train, 28, 28, 1);
    let (test, test_px) = idx_images(n_test, 28, 28, 2);
    fs::write(dir.join("train-images-idx3-ubyte.gz"), gzip(&train)).unwrap();
    fs::write(dir.join("t10k-images-idx3-ubyte"), test).unwrap();
    (train_px, test_px)
}

#[test]
fn small_mnist_dir_loads_with_splits() {
    let dir = tempfile::tempdir().unwrap();
    let (train_px, test_px) = write_mnist_dir(dir.path(), 12, 3);
    let ds = load_mnist_dir(dir.path()).unwrap();
    assert_eq!((ds.train.n, ds.valid.n, ds.test.n), (10, 2, 3));
    assert_eq!(ds.dim, 784);
    assert_eq!(ds.image_shape, Some([1, 28, 28]));
    assert!(ds.discrete);
    let f = |px: &[u8]| px.iter().map(|&b| f32::from(b)).collect::<Vec<f32>>();
    assert_eq!(ds.train.values, f(&train_px[..10 * 784]));
    assert_eq!(ds.valid.values, f(&train_px[10 * 784..]));
    assert_eq!(ds.test.values, f(&test_px));
    // a directory argument goes to the MNIST loader
    assert_eq!(load_data(Some(dir.path())).unwrap().valid.n, 2);
}

#[test]
fn mnist_dir_accepts_dotted_naming_variant() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = idx_images(7, 28, 28, 1);
    let (test, _) = idx_images(2, 28, 28, 2);
    fs::write(dir.path().join("train-images.idx3-ubyte"), train).unwrap();
    fs::write(dir.path().join("t10k-images.idx3-ubyte.gz"), gzip(&test)).unwrap();
    let ds = load_mnist_dir(dir.path()).unwrap();
    assert_eq!((ds.train.n, ds.valid.n, ds.test.n), (6, 1, 2));
}

#[test]
fn mnist_dir_missing_file_lists_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = idx_images(12, 28, 28, 1);
    fs::write(dir.path().join("train-images-idx3-ubyte"), train).unwrap();
    let msg = load_mnist_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("t10k-images-idx3-ubyte.gz"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    let msg = load_mnist_dir(empty.path()).unwrap_err().to_string();
    assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
}

#[test]
fn mnist_dir_size_mismatch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = idx_images(12, 28, 28, 1);
    let (test, _) = idx_images(3, 14, 14, 2);
    fs::write(dir.path().join("train-images-idx3-ubyte"), train).unwrap();
    let tp = dir.path().join("t10k-images-idx3-ubyte");
    fs::write(&tp, test).unwrap();
    expect_err_naming(&tp, load_mnist_dir(dir.path()), "14x14");
}

#[test]
fn npy_round_trip_f32_and_f64() {
    let dir = tempfile::tempdir().unwrap();
    let p32 = dir.path().join("a.npy");
    let v32: Vec<f32> = (0..15).map(|i| i as f32 * 0.5 - 3.25).collect();
    write_npy_f32(&p32, &[5, 3], &v32).unwrap();
    let (shape, back) = read_npy(&p32).unwrap();
    assert_eq!(shape, vec![5, 3]);
    assert_eq!(back, v32.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
    assert_eq!(&fs::read(&p32).unwrap()[..6], b"\x93NUMPY");

    let p64 = dir.path().join("b.npy");
    let v64: Vec<f64> = (0..15)
        .map(|i| (i as f64).sqrt() * 1e-7 + 1.0 / 3.0)
        .collect();
    write_npy_f64(&p64, &[5, 3], &v64).unwrap();
    assert_eq!(read_npy(&p64).unwrap(), (vec![5, 3], v64));
    // no temporary files left behind
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
}

/// A version-1.0 `.npy` file as numpy writes it: magic, header padded to 64 bytes, `body`.
fn npy_v1(descr: &str, shape: &str, body: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = vec![0x93, b'N', b'U', b'M', b'P', b'Y', 1, 0];
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// A float64 npy written byte by byte, as numpy 1.x writes `np.array([[1.5, -2], [0.25, 1e300]])`.
#[test]
fn hand_written_float64_npy_is_read() {
    let body: Vec<u8> = [1.5f64, -2.0, 0.25, 1e300]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let bytes = npy_v1("<f8", "(2, 2)", &body);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hand.npy");
    fs::write(&p, bytes).unwrap();
    assert_eq!(
        read_npy(&p).unwrap(),
        (vec![2, 2], vec![1.5, -2.0, 0.25, 1e300])
    );
}

/// A `.npy` of 8-bit values is 8-bit data whatever its dtype: `uint8`, or floats holding
/// integers 0..=255. A `dequantize_logit` spec trains on it; a `preprocess: none` spec is
/// refused with the advice to dequantize, and a `dequantize_logit` spec on continuous data
/// with the advice to use `none` and the first value that is not 8-bit.
#[test]
fn eight_bit_npy_is_discrete_data() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (5, 4);
    // [N, 1, 2, 2] uint8, written as numpy writes it.
    let body: Vec<u8> = (0..n * d).map(|i| (i * 53 % 256) as u8).collect();
    let bytes = npy_v1("|u1", &format!("({n}, 1, 2, 2)"), &body);
    let u8_path = dir.path().join("bytes.npy");
    fs::write(&u8_path, bytes).unwrap();
    let floats = |name: &str, vals: &[f32]| {
        let p = dir.path().join(name);
        write_npy_f32(&p, &[n, d], vals).unwrap();
        load_npy_dataset(&p).unwrap()
    };
    let integers: Vec<f32> = (0..n * d).map(|i| (i * 53 % 256) as f32).collect();
    let mut above = integers.clone();
    above[6] = 256.0;
    let mut fraction = integers.clone();
    fraction[3] = 2.5;

    let uint8 = load_npy_dataset(&u8_path).unwrap();
    assert!(uint8.discrete);
    assert_eq!(uint8.train.values, integers[..uint8.train.values.len()]);
    assert!(floats("ints.npy", &integers).discrete);
    assert!(!floats("above.npy", &above).discrete);
    let fraction = floats("fraction.npy", &fraction);
    assert!(!fraction.discrete);

    let spec = |preprocess: &str| {
        snfc_compiler::spec::parse_spec(&format!(
            r#"{{"name": "e", "input": {{"shape": [1, 2, 2], "preprocess": "{preprocess}"}},
                "layers": [{{"type": "linear"}}], "train": {{"batch_size": 1}}}}"#
        ))
        .unwrap()
    };
    let check = |preprocess: &str, ds: &snfc_runtime::data::Dataset| {
        snfc_runtime::train::check_data(&spec(preprocess), ds).map_err(|e| e.to_string())
    };
    check("dequantize_logit", &uint8).expect("8-bit data dequantizes");
    let err = check("none", &uint8).unwrap_err();
    assert!(
        err.contains("8-bit data") && err.contains("\"dequantize_logit\""),
        "{err}"
    );
    let err = check("dequantize_logit", &fraction).unwrap_err();
    assert!(
        err.contains("continuous") && err.contains("[3] = 2.5") && err.contains("\"none\""),
        "{err}"
    );
    check("none", &fraction).expect("continuous data as it is");
}

#[test]
fn npy_dataset_splits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("moons.npy");
    let n = 25;
    let vals: Vec<f32> = (0..n * 2 * 3).map(|i| i as f32 + 0.5).collect();
    write_npy_f32(&p, &[n, 2, 3], &vals).unwrap();
    let ds = load_npy_dataset(&p).unwrap();
    assert_eq!(ds.name, "moons");
    assert_eq!(ds.dim, 6);
    assert!(!ds.discrete);
    assert_eq!(ds.image_shape, None);
    assert_eq!((ds.train.n, ds.valid.n, ds.test.n), (21, 2, 2));
    assert_eq!(ds.train.example(0), &vals[..6]);
    assert_eq!(ds.valid.example(0), &vals[21 * 6..22 * 6]);
    assert_eq!(ds.test.example(1), &vals[24 * 6..]);
    let via_load_data = load_data(Some(&p)).unwrap();
    assert_eq!(via_load_data.test.values, ds.test.values);

    let p100 = dir.path().join("hundred.npy");
    write_npy_f64(
        &p100,
        &[100, 1],
        &(0..100).map(f64::from).collect::<Vec<_>>(),
    )
    .unwrap();
    let ds = load_npy_dataset(&p100).unwrap();
    assert_eq!((ds.train.n, ds.valid.n, ds.test.n), (80, 10, 10));

    let p3 = dir.path().join("three.npy");
    write_npy_f32(&p3, &[3], &[1.0, 2.0, 3.0]).unwrap();
    let ds = load_npy_dataset(&p3).unwrap();
    assert_eq!((ds.train.n, ds.valid.n, ds.test.n, ds.dim), (1, 1, 1, 1));

    let p2 = dir.path().join("two.npy");
    write_npy_f32(&p2, &[2, 4], &[0.0; 8]).unwrap();
    expect_err_naming(&p2, load_npy_dataset(&p2), "at least 3");

    let pnan = dir.path().join("nan.npy");
    write_npy_f32(&pnan, &[3, 1], &[0.0, f32::NAN, 1.0]).unwrap();
    expect_err_naming(&pnan, load_npy_dataset(&pnan), "non-finite");
}

#[test]
fn load_data_rejects_unknown_paths() {
    let dir = tempfile::tempdir().unwrap();
    let missing: PathBuf = dir.path().join("nope.npy");
    expect_err_naming(&missing, load_data(Some(&missing)), "does not exist");
    let txt = dir.path().join("data.csv");
    fs::write(&txt, "1,2\n").unwrap();
    expect_err_naming(&txt, load_data(Some(&txt)), "unsupported");
}

fn decode_png(path: &Path) -> (png::OutputInfo, Vec<u8>) {
    let file = std::io::BufReader::new(fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info, buf)
}

#[test]
fn png_grid_grayscale_layout() {
    // 5 images of 3x4 (h x w): 3 columns, 2 rows; image k has pixel (y, x) = 10k + 4y + x + 1.
    let (n, h, w) = (5, 3, 4);
    let imgs: Vec<u8> = (0..n)
        .flat_map(|k| (0..h * w).map(move |i| (10 * k + i + 1) as u8))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("grid.png");
    write_png_grid(&p, &imgs, n, 1, h, w).unwrap();
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temporary file left behind"
    );
    let (info, px) = decode_png(&p);
    let (gw, gh) = (3 * w + 4 * 2, 2 * h + 3 * 2);
    assert_eq!((info.width as usize, info.height as usize), (gw, gh));
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    let at = |y: usize, x: usize| px[y * gw + x];
    assert_eq!(at(0, 0), 128); // gutter
    assert_eq!(at(2, 2), 1); // image 0, (0, 0)
    assert_eq!(at(2 + 2, 2 + 3), 12); // image 0, (2, 3)
    assert_eq!(at(2, 2 + w + 2), 11); // image 1, (0, 0)
    assert_eq!(at(2, 2 + w + 1), 128); // gutter between images 0 and 1
    assert_eq!(at(2 + h + 2 + 1, 2 + w + 2 + 2), 10 * 4 + 4 + 2 + 1); // image 4, (1, 2)
    assert_eq!(at(2 + h + 2, 2 + 2 * (w + 2)), 128); // empty sixth cell
}

#[test]
fn png_grid_rgb_is_channel_major() {
    // one 2x2 RGB image: R plane 10.., G plane 20.., B plane 30..
    let img: Vec<u8> = vec![10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rgb.png");
    write_png_grid(&p, &img, 1, 3, 2, 2).unwrap();
    let (info, px) = decode_png(&p);
    assert_eq!((info.width, info.height), (6, 6));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let at = |y: usize, x: usize| &px[(y * 6 + x) * 3..(y * 6 + x) * 3 + 3];
    assert_eq!(at(2, 2), &[10, 20, 30]);
    assert_eq!(at(3, 2), &[12, 22, 32]);
    assert_eq!(at(3, 3), &[13, 23, 33]);
    assert_eq!(at(0, 0), &[128, 128, 128]);
    // overwriting an existing file works (rename over it)
    write_png_grid(&p, &img, 1, 3, 2, 2).unwrap();
}

/// A CIFAR-10 binary batch of `n` records: label `i % 10`, pixel `j` of record `i` =
/// `(seed + 7i + j) % 256`.
fn cifar_batch(path: &Path, n: usize, seed: usize) {
    let mut bytes = Vec::new();
    for i in 0..n {
        bytes.push((i % 10) as u8);
        bytes.extend((0..3072).map(|j| ((seed + 7 * i + j) % 256) as u8));
    }
    fs::write(path, bytes).unwrap();
}

#[test]
fn cifar10_binary_batches_load_in_order_with_a_validation_tail() {
    let dir = tempfile::tempdir().unwrap();
    cifar_batch(&dir.path().join("data_batch_1.bin"), 30, 0);
    cifar_batch(&dir.path().join("data_batch_2.bin"), 20, 100);
    cifar_batch(&dir.path().join("test_batch.bin"), 10, 200);
    let ds = snfc_runtime::data::load_data(Some(dir.path())).expect("CIFAR-10 loads");
    assert_eq!((ds.name.as_str(), ds.dim), ("cifar10", 3072));
    assert_eq!(ds.image_shape, Some([3, 32, 32]));
    assert!(ds.discrete);
    // 50 training images: the last tenth validates.
    assert_eq!((ds.train.n, ds.valid.n, ds.test.n), (45, 5, 10));
    // Labels are dropped; pixels keep the file's (c, h, w) order; batches follow each other.
    assert_eq!(ds.train.example(0)[..3], [0.0, 1.0, 2.0]);
    assert_eq!(ds.train.example(30)[0], 100.0);
    // Validation starts at training image 45: record 15 of the second batch.
    assert_eq!(ds.valid.example(0)[0], (100 + 7 * 15) as f32);
    assert_eq!(ds.test.example(1)[3071], ((200 + 7 + 3071) % 256) as f32);
    // A spec over [3, 32, 32] 8-bit images trains on it.
    let spec = snfc_compiler::spec::parse_spec(
        r#"{"name": "c", "input": {"shape": [3, 32, 32], "preprocess": "dequantize_logit"},
            "layers": [{"type": "squeeze"}, {"type": "actnorm"},
                       {"type": "conv", "kernel_size": 1, "bias": false},
                       {"type": "affine_coupling", "width": 4}],
            "train": {"batch_size": 9}}"#,
    )
    .unwrap();
    snfc_runtime::train::check_data(&spec, &ds).expect("shapes match");
}

#[test]
fn bad_cifar10_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    cifar_batch(&dir.path().join("data_batch_1.bin"), 5, 0);
    let err = snfc_runtime::data::load_data(Some(dir.path()))
        .expect_err("no test batch")
        .to_string();
    assert!(err.contains("test_batch.bin"), "{err}");
    cifar_batch(&dir.path().join("test_batch.bin"), 2, 0);
    // Truncated: a record cut short.
    let path = dir.path().join("data_batch_2.bin");
    fs::write(&path, vec![1u8; 3073 + 100]).unwrap();
    let err = snfc_runtime::data::load_data(Some(dir.path()))
        .expect_err("truncated")
        .to_string();
    assert!(
        err.contains("data_batch_2.bin") && err.contains("3073"),
        "{err}"
    );
    // A CIFAR-100 file (two label bytes shift every record): a label out of range.
    let mut bad = vec![0u8; 3073];
    bad[0] = 57;
    fs::write(&path, bad).unwrap();
    let err = snfc_runtime::data::load_data(Some(dir.path()))
        .expect_err("bad label")
        .to_string();
    assert!(
        err.contains("data_batch_2.bin") && err.contains("label 57"),
        "{err}"
    );
}

/// `train.augment = "pad_crop"`: every augmented example is one of the nine crops of its
/// reflect-padded image (reflect as PyTorch: index −1 reads 1), each crop occurs, and the spec
/// option parses, round-trips and is refused for flat inputs.
#[test]
fn pad_crop_takes_crops_of_the_reflect_padded_image() {
    use rand::SeedableRng;
    let (c, h, w, batch) = (2, 4, 3, 200);
    let image =
        |b: usize| -> Vec<f64> { (0..c * h * w).map(|k| (k * 31 + b * 7) as f64).collect() };
    let mut x = vec![0.0f64; c * h * w * batch];
    for b in 0..batch {
        for (k, v) in image(b).into_iter().enumerate() {
            x[k * batch + b] = v;
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    snfc_runtime::batch::pad_crop(&mut x, [c, h, w], batch, &mut rng);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        (if i < 0 {
            -i
        } else if i >= n {
            2 * n - 2 - i
        } else {
            i
        }) as usize
    };
    let mut seen = std::collections::BTreeSet::new();
    for b in 0..batch {
        let src = image(b);
        let got: Vec<f64> = (0..c * h * w).map(|k| x[k * batch + b]).collect();
        let offset = (0..3isize)
            .flat_map(|dy| (0..3isize).map(move |dx| (dy, dx)))
            .find(|&(dy, dx)| {
                (0..c * h * w).all(|k| {
                    let (ch, y, xx) = (k / (h * w), k / w % h, k % w);
                    let sy = reflect(y as isize + dy - 1, h);
                    let sx = reflect(xx as isize + dx - 1, w);
                    got[k] == src[(ch * h + sy) * w + sx]
                })
            });
        seen.insert(offset.unwrap_or_else(|| panic!("example {b} is no crop: {got:?}")));
    }
    assert_eq!(seen.len(), 9, "every offset occurs: {seen:?}");
    // The spec option.
    let text = |shape: &str| {
        format!(
            r#"{{"name": "a", "input": {{"shape": {shape}, "preprocess": "none"}},
                "layers": [{{"type": "spline"}}], "train": {{"augment": "pad_crop"}}}}"#
        )
    };
    let spec = snfc_compiler::spec::parse_spec(&text("[1, 4, 4]")).expect("valid");
    assert_eq!(spec.train.augment, snfc_compiler::spec::Augment::PadCrop);
    assert_eq!(
        snfc_compiler::spec::parse_spec(&spec.to_json_pretty()).unwrap(),
        spec
    );
    let err = snfc_compiler::spec::parse_spec(&text("[16]"))
        .expect_err("flat input")
        .to_string();
    assert!(err.contains("/train/augment"), "{err}");
}

/// `train.augment = "hflip"`: each example is its image or its mirror image (every row reversed,
/// channels kept), about half of them mirrored, the same ones for the same generator state;
/// `"hflip_pad_crop"` parses and is refused for flat inputs.
#[test]
fn hflip_mirrors_about_half_the_images() {
    use rand::SeedableRng;
    let (c, h, w, batch) = (2, 3, 5, 400);
    let image =
        |b: usize| -> Vec<f64> { (0..c * h * w).map(|k| (k * 31 + b * 7) as f64).collect() };
    let mut x = vec![0.0f64; c * h * w * batch];
    for b in 0..batch {
        for (k, v) in image(b).into_iter().enumerate() {
            x[k * batch + b] = v;
        }
    }
    let mut again = x.clone();
    snfc_runtime::batch::hflip(
        &mut x,
        [c, h, w],
        batch,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(9),
    );
    snfc_runtime::batch::hflip(
        &mut again,
        [c, h, w],
        batch,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(9),
    );
    assert_eq!(x, again, "the same draws flip the same examples");
    let mut mirrored = 0;
    for b in 0..batch {
        let src = image(b);
        let got: Vec<f64> = (0..c * h * w).map(|k| x[k * batch + b]).collect();
        let mirror: Vec<f64> = (0..c * h * w)
            .map(|k| {
                let (row, xx) = (k / w, k % w);
                src[row * w + (w - 1 - xx)]
            })
            .collect();
        if got == mirror {
            mirrored += 1;
        } else {
            assert_eq!(got, src, "example {b} is neither the image nor its mirror");
        }
    }
    assert!(
        (150..=250).contains(&mirrored),
        "{mirrored} of {batch} mirrored"
    );
    let text = |shape: &str| {
        format!(
            r#"{{"name": "a", "input": {{"shape": {shape}, "preprocess": "none"}},
                "layers": [{{"type": "spline"}}], "train": {{"augment": "hflip_pad_crop"}}}}"#
        )
    };
    let spec = snfc_compiler::spec::parse_spec(&text("[1, 4, 4]")).expect("valid");
    assert_eq!(
        spec.train.augment,
        snfc_compiler::spec::Augment::HflipPadCrop
    );
    assert!(spec.train.augment.flips() && spec.train.augment.pad_crops());
    let err = snfc_compiler::spec::parse_spec(&text("[16]"))
        .expect_err("flat input")
        .to_string();
    assert!(
        err.contains("/train/augment") && err.contains("hflip_pad_crop"),
        "{err}"
    );
}
