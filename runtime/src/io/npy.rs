//! Reading and writing NumPy `.npy` arrays (C order) via the `npyz` crate.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use npyz::{DType, NpyFile, Order, TypeChar, WriteOptions, WriterBuilder};

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

fn classify(dtype: &DType) -> Option<Elem> {
    let DType::Plain(ts) = dtype else {
        return None;
    };
    match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => Some(Elem::F32),
        (TypeChar::Float, 8) => Some(Elem::F64),
        (TypeChar::Uint, 1) => Some(Elem::U8),
        (TypeChar::Int, 4) => Some(Elem::I32),
        (TypeChar::Int, 8) => Some(Elem::I64),
        _ => None,
    }
}

fn read_all<T, R>(npy: NpyFile<R>, path: &Path, shape: &[usize]) -> Result<Vec<T>, DataError>
where
    T: npyz::Deserialize,
    R: Read,
{
    npy.into_vec::<T>().map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            DataError::invalid(
                path.display().to_string(),
                format!("npy data is truncated: the file is shorter than its header's shape {shape:?} requires"),
            )
        } else {
            DataError::io(path, "cannot read npy data", e)
        }
    })
}

/// Read a `.npy` array of float32, float64, uint8, int32 or int64 (C order) as its shape and its
/// values converted to f64 (int64 values beyond 2^53 lose precision).
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let origin = path.display().to_string();
    let file = File::open(path).map_err(|e| DataError::io(path, "cannot open npy file", e))?;
    let npy = NpyFile::new(BufReader::new(file)).map_err(|e| {
        DataError::invalid(&origin, format!("not a valid npy file (bad header): {e}"))
    })?;
    if npy.order() == Order::Fortran {
        return Err(DataError::invalid(
            origin,
            "array is stored in Fortran order; only C order is supported (save it with np.ascontiguousarray)",
        ));
    }
    let dtype = npy.dtype();
    let Some(elem) = classify(&dtype) else {
        return Err(DataError::invalid(
            origin,
            format!(
                "unsupported dtype {}; expected float32, float64, uint8, int32 or int64",
                dtype.descr()
            ),
        ));
    };
    let shape = npy
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| DataError::invalid(&origin, "array shape does not fit in memory"))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            DataError::invalid(&origin, format!("array shape {shape:?} is too large"))
        })?;
    let values: Vec<f64> = match elem {
        Elem::F32 => read_all::<f32, _>(npy, path, &shape)?
            .into_iter()
            .map(f64::from)
            .collect(),
        Elem::F64 => read_all::<f64, _>(npy, path, &shape)?,
        Elem::U8 => read_all::<u8, _>(npy, path, &shape)?
            .into_iter()
            .map(f64::from)
            .collect(),
        Elem::I32 => read_all::<i32, _>(npy, path, &shape)?
            .into_iter()
            .map(f64::from)
            .collect(),
        Elem::I64 => read_all::<i64, _>(npy, path, &shape)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
    };
    if values.len() != count {
        return Err(DataError::invalid(
            origin,
            format!(
                "expected {count} values for shape {shape:?}, read {}",
                values.len()
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
