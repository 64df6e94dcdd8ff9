//! A flow's parameters: initialization (paper A.3), dtype conversion and safetensors files.
//!
//! Checkpoints and parameter files are safetensors with the names of
//! [`snfc_compiler::ir::lower::parameters`]: `layers.{i}.weight` [D, D] (z = W x + b),
//! `layers.{i}.weight_inv` [D, D] (x̂ = R (z − b)), `layers.{i}.bias` [D]. A checkpoint stores
//! the spec JSON in its metadata under `spec`, so it is self-contained.

use crate::host::exec::Feeds;
use crate::host::linalg::Real;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Normal;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use snfc_compiler::ir::lower::{parameters, ParamInfo, ParamKind};
use snfc_compiler::spec::{parse_spec, FlowSpec, LayerSpec, LinearInit};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// The string metadata of a safetensors file, read from its header alone (the first 8 bytes
/// give the header's length): what a run's spec and options need, without reading the
/// tensors. The tensors are checked when the file is loaded.
pub fn header_metadata(path: &Path) -> Result<HashMap<String, String>, String> {
    use std::io::Read;
    // safetensors' own limit on a header.
    const MAX_HEADER: u64 = 100_000_000;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| "not a safetensors file: shorter than its 8-byte header length".to_string())?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(format!(
            "not a safetensors file: a header of {len} bytes (at most {MAX_HEADER})"
        ));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|_| {
        format!("not a safetensors file: the file ends inside its {len}-byte header")
    })?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| format!("not a safetensors file: its header is not JSON: {e}"))?;
    let Some(meta) = header.get("__metadata__") else {
        return Ok(HashMap::new());
    };
    serde_json::from_value(meta.clone())
        .map_err(|e| format!("not a safetensors file: its `__metadata__` is not strings: {e}"))
}

fn file_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// A spec and one value per parameter.
#[derive(Debug, Clone)]
pub struct Model<T> {
    pub spec: FlowSpec,
    pub params: Vec<ParamInfo>,
    pub values: Feeds<T>,
    /// Whether the data-dependent initialization (actnorm) has run: false only for a fresh
    /// model of a spec with actnorm layers. Saved in checkpoints (metadata
    /// `data_initialized`), so evaluation or a resumed run never initializes again.
    pub data_initialized: bool,
}

/// Metadata key of [`Model::data_initialized`].
pub const DATA_INITIALIZED: &str = "data_initialized";

impl<T: Real> Model<T> {
    /// Paper A.3: a linear layer's W = I + Xavier-normal noise with gain 0.01 (or exactly I) and
    /// R = Wᵀ; a conv layer's kernel w = dirac + Xavier-normal noise with gain 0.01 and
    /// r = flip_kernel(w) (the transposed convolution); biases 0.
    pub fn init(spec: &FlowSpec, seed: u64) -> Model<T> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let params = parameters(spec);
        let mut values: Feeds<T> = HashMap::new();
        let mut last_w: Vec<f64> = Vec::new();
        for p in &params {
            let layer = &spec.layers[p.layer];
            let v: Vec<f64> = match (p.kind, layer) {
                (ParamKind::Weight, LayerSpec::Linear(l)) => {
                    let d = p.shape[0];
                    let std = 0.01 * (2.0 / (2 * d) as f64).sqrt();
                    let normal = Normal::new(0.0, std).expect("finite std");
                    let noise = l.init == LinearInit::IdentityNoise;
                    let mut w = vec![0.0; d * d];
                    for i in 0..d {
                        for j in 0..d {
                            let eye = if i == j { 1.0 } else { 0.0 };
                            let n = if noise { rng.sample(normal) } else { 0.0 };
                            w[i * d + j] = eye + n;
                        }
                    }
                    last_w = w.clone();
                    w
                }
                (ParamKind::Weight, _) => {
                    // [C, C, K, K]: fan_in = fan_out = C·K²
                    let (c, k) = (p.shape[0], p.shape[2]);
                    let std = 0.01 * (2.0 / (2 * c * k * k) as f64).sqrt();
                    let normal = Normal::new(0.0, std).expect("finite std");
                    let mut w: Vec<f64> = (0..c * c * k * k).map(|_| rng.sample(normal)).collect();
                    for ch in 0..c {
                        w[((ch * c + ch) * k + k / 2) * k + k / 2] += 1.0;
                    }
                    last_w = w.clone();
                    w
                }
                (ParamKind::WeightInv, LayerSpec::Linear(_)) => {
                    let d = p.shape[0];
                    let mut r = vec![0.0; d * d];
                    for i in 0..d {
                        for j in 0..d {
                            r[i * d + j] = last_w[j * d + i];
                        }
                    }
                    r
                }
                (ParamKind::WeightInv, _) => crate::host::shape_ops::flip_kernel(&last_w, &p.shape),
                (ParamKind::Bias, _) => vec![0.0; p.shape.iter().product()],
                // Equal bins and unit derivatives: the spline starts as the identity.
                (ParamKind::SplineWidths | ParamKind::SplineHeights, _) => {
                    vec![0.0; p.shape.iter().product()]
                }
                (ParamKind::SplineDerivatives, _) => {
                    let unit = (1.0 - crate::host::spline::MIN_DERIVATIVE).exp_m1().ln();
                    vec![unit; p.shape.iter().product()]
                }
                // Glow: the network's first convs N(0, 0.05²); its last conv, its log-scale and
                // every bias zero, so a fresh coupling is the identity.
                (ParamKind::CouplingWeight(k), _) if k < 2 => {
                    let normal = Normal::new(0.0, 0.05).expect("finite std");
                    (0..p.shape.iter().product::<usize>())
                        .map(|_| rng.sample(normal))
                        .collect()
                }
                (
                    ParamKind::CouplingWeight(_)
                    | ParamKind::CouplingBias(_)
                    | ParamKind::CouplingLogs,
                    _,
                ) => vec![0.0; p.shape.iter().product()],
                // The identity until the data-dependent initialization (`commands::train`).
                (ParamKind::ActnormTranslation | ParamKind::ActnormLogScale, _) => {
                    vec![0.0; p.shape.iter().product()]
                }
            };
            values.insert(
                p.name.clone(),
                Arc::new(v.into_iter().map(T::of_f64).collect()),
            );
        }
        Model {
            spec: spec.clone(),
            params,
            values,
            data_initialized: !spec
                .layers
                .iter()
                .any(|l| matches!(l, LayerSpec::Actnorm(_))),
        }
    }

    /// A parameter's values; a name the spec does not have is a bug in the caller.
    pub fn get(&self, name: &str) -> &[T] {
        &self.values[name]
    }

    /// The same parameters in another precision.
    pub fn cast<U: Real>(&self) -> Model<U> {
        Model {
            spec: self.spec.clone(),
            params: self.params.clone(),
            values: self
                .values
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        Arc::new(v.iter().map(|x| U::of_f64(x.as_f64())).collect()),
                    )
                })
                .collect(),
            data_initialized: self.data_initialized,
        }
    }

    /// Write the parameters (plus `extra` tensors, e.g. scalars) as safetensors with `metadata`,
    /// atomically (a crash leaves the old file or the new one, never a broken one).
    pub fn save(
        &self,
        path: &Path,
        extra: &[RawTensor],
        metadata: HashMap<String, String>,
    ) -> Result<(), ModelError> {
        let bytes = self.to_bytes(path, extra, metadata)?;
        write_bytes_atomically(path, &bytes)
    }

    /// The safetensors bytes [`Model::save`] writes (`path` names the file in errors): what
    /// a caller hands to a [`crate::atomic::BackgroundWriter`].
    pub fn to_bytes(
        &self,
        path: &Path,
        extra: &[RawTensor],
        mut metadata: HashMap<String, String>,
    ) -> Result<Vec<u8>, ModelError> {
        metadata.insert("spec".into(), self.spec.to_json_pretty());
        metadata.insert("format".into(), "snfc-params-v1".into());
        metadata.insert(DATA_INITIALIZED.into(), self.data_initialized.to_string());
        let mut tensors = Vec::with_capacity(self.params.len() + extra.len());
        for p in &self.params {
            let v = self
                .values
                .get(&p.name)
                .ok_or_else(|| file_err(path, format!("no value for parameter `{}`", p.name)))?;
            tensors.push(RawTensor::of(&p.name, &p.shape, v));
        }
        tensors.extend(extra.iter().cloned());
        raw_safetensors_bytes(path, &tensors, metadata)
    }

    /// Load a parameter file. The spec comes from `spec` if given, else from the file's metadata.
    pub fn load(
        path: &Path,
        spec: Option<&FlowSpec>,
    ) -> Result<(Model<T>, HashMap<String, String>), ModelError> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        Self::from_bytes(&bytes, path, spec)
    }

    /// [`Model::load`] of a file's bytes; `path` names the file in errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        spec: Option<&FlowSpec>,
    ) -> Result<(Model<T>, HashMap<String, String>), ModelError> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let spec = match spec {
            Some(s) => s.clone(),
            None => {
                let text = metadata.get("spec").ok_or_else(|| {
                    file_err(path, "has no `spec` in its metadata; pass --spec SPEC.json")
                })?;
                parse_spec(text)
                    .map_err(|e| file_err(path, format!("metadata `spec` is invalid: {e}")))?
            }
        };
        let params = parameters(&spec);
        let mut values: Feeds<T> = HashMap::new();
        for p in &params {
            let t = st.tensor(&p.name).map_err(|_| {
                file_err(
                    path,
                    format!(
                        "missing tensor `{}` (shape {:?}) required by spec `{}`",
                        p.name, p.shape, spec.name
                    ),
                )
            })?;
            values.insert(
                p.name.clone(),
                Arc::new(tensor_values(path, &p.name, &t, &p.shape)?),
            );
        }
        Ok((
            Model {
                spec,
                params,
                values,
                // A file without the key holds whatever values it holds: never re-initialize.
                data_initialized: metadata.get(DATA_INITIALIZED).map(String::as_str)
                    != Some("false"),
            },
            metadata,
        ))
    }
}

/// The values of a safetensors tensor as `T`, checking its shape (f32 or f64 stored) and that
/// every value is finite (in `T`: an f64 beyond f32's range is an error when loading as f32).
pub fn tensor_values<T: Real>(
    path: &Path,
    name: &str,
    t: &TensorView,
    shape: &[usize],
) -> Result<Vec<T>, ModelError> {
    if t.shape() != shape {
        return Err(file_err(
            path,
            format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.shape()
            ),
        ));
    }
    let d = t.data();
    let values: Vec<T> = match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| T::of_f64(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                T::of_f64(f64::from_le_bytes(b))
            })
            .collect(),
        other => {
            return Err(file_err(
                path,
                format!("tensor `{name}` has dtype {other:?}; expected F32 or F64"),
            ))
        }
    };
    // A NaN or infinite parameter (a diverged run, a corrupt file) would only show up later as
    // NaN losses or samples, far from its cause.
    if let Some(i) = values.iter().position(|v| !v.as_f64().is_finite()) {
        let stored = match t.dtype() {
            Dtype::F32 => f64::from(f32::from_le_bytes([
                d[4 * i],
                d[4 * i + 1],
                d[4 * i + 2],
                d[4 * i + 3],
            ])),
            _ => f64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap_or([0; 8])),
        };
        return Err(file_err(
            path,
            format!(
                "tensor `{name}` has the value {stored:?} at flat index {i}, which is not finite in {}",
                T::NAME
            ),
        ));
    }
    Ok(values)
}

/// Write named tensors (in `T`'s dtype) to a safetensors file atomically
/// ([`crate::atomic::write_atomically`]).
pub fn write_safetensors<T: Real>(
    path: &Path,
    named: &[(String, Vec<usize>, Vec<T>)],
    metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    let raw = named
        .iter()
        .map(|(name, shape, v)| RawTensor::of(name, shape, v))
        .collect::<Vec<_>>();
    write_raw_safetensors(path, &raw, metadata)
}

/// One tensor to write: its name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Each value's `N` little-endian bytes, written into a buffer of the final size (a
/// `flat_map(..).collect()` grows its vector as it goes: 40 ms for mnist_fc2's checkpoint
/// instead of a few).
fn le_bytes<X, const N: usize>(values: &[X], bytes_of: impl Fn(&X) -> [u8; N]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * N];
    for (dst, x) in out.chunks_exact_mut(N).zip(values) {
        dst.copy_from_slice(&bytes_of(x));
    }
    out
}

impl RawTensor {
    /// Values in `T`'s dtype (F32 or F64).
    pub fn of<T: Real>(name: &str, shape: &[usize], values: &[T]) -> RawTensor {
        let (dtype, bytes) = if T::NAME == "f32" {
            (
                Dtype::F32,
                le_bytes(values, |x| (x.as_f64() as f32).to_le_bytes()),
            )
        } else {
            (Dtype::F64, le_bytes(values, |x| x.as_f64().to_le_bytes()))
        };
        RawTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            bytes,
        }
    }

    /// Unsigned 32-bit integers (U32).
    pub fn of_u32(name: &str, values: &[u32]) -> RawTensor {
        RawTensor {
            name: name.to_string(),
            dtype: Dtype::U32,
            shape: vec![values.len()],
            bytes: le_bytes(values, |x| x.to_le_bytes()),
        }
    }
}

/// Write tensors of any dtype to a safetensors file atomically.
pub fn write_raw_safetensors(
    path: &Path,
    tensors: &[RawTensor],
    metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    let bytes = raw_safetensors_bytes(path, tensors, metadata)?;
    write_bytes_atomically(path, &bytes)
}

/// `tensors` with `metadata` encoded as safetensors (`path` names the file in errors).
pub fn raw_safetensors_bytes(
    path: &Path,
    tensors: &[RawTensor],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let mut views = Vec::new();
    for t in tensors {
        let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
            .map_err(|e| file_err(path, format!("tensor `{}`: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| file_err(path, format!("cannot encode: {e}")))
}

/// A failed atomic write as a [`ModelError`] naming the file and the step that failed.
pub fn write_error(e: crate::atomic::WriteError) -> ModelError {
    ModelError::File {
        path: e.path,
        message: format!("cannot {}: {}", e.step, e.source),
    }
}

fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    crate::atomic::write_atomically(path, bytes).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> FlowSpec {
        parse_spec(
            r#"{"name": "s", "input": {"shape": [2], "preprocess": "none"}, "layers": [{"type": "linear"}]}"#,
        )
        .unwrap()
    }

    fn file_with(spec: &FlowSpec, bias: RawTensor) -> Vec<u8> {
        let m = Model::<f64>::init(spec, 0);
        let views = m
            .params
            .iter()
            .map(|p| {
                if p.name == bias.name {
                    bias.clone()
                } else {
                    RawTensor::of(&p.name, &p.shape, &m.values[&p.name])
                }
            })
            .collect::<Vec<_>>();
        let views = views
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
                )
            })
            .collect::<Vec<_>>();
        let meta = HashMap::from([("spec".to_string(), spec.to_json_pretty())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    /// The header alone gives the metadata of a whole file; a file cut anywhere inside its
    /// header, or with a header that is no JSON or too long, is an error, never a panic.
    #[test]
    fn header_metadata_reads_only_the_header() {
        let spec = small();
        let bytes = file_with(&spec, RawTensor::of("layers.0.bias", &[2], &[0.5, 1.5]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let meta = header_metadata(&path).unwrap();
        assert_eq!(meta["spec"], spec.to_json_pretty());
        // The tensors are not read: a file cut after its header still gives its metadata.
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        std::fs::write(&path, &bytes[..header_end]).unwrap();
        assert_eq!(
            header_metadata(&path).unwrap()["spec"],
            spec.to_json_pretty()
        );
        for end in [0, 5, 8, 20, header_end - 1] {
            std::fs::write(&path, &bytes[..end]).unwrap();
            let e = header_metadata(&path).unwrap_err();
            assert!(e.starts_with("not a safetensors file"), "{end}: {e}");
        }
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        assert!(header_metadata(&path).unwrap_err().contains("header of"));
        let mut junk = bytes.clone();
        junk[8] = b'!';
        std::fs::write(&path, &junk).unwrap();
        assert!(header_metadata(&path).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn non_finite_parameters_are_refused_with_their_name_and_index() {
        let spec = small();
        let path = Path::new("p.safetensors");
        let nan = file_with(
            &spec,
            RawTensor::of("layers.0.bias", &[2], &[0.0, f64::NAN]),
        );
        let msg = Model::<f64>::from_bytes(&nan, path, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "p.safetensors: tensor `layers.0.bias` has the value NaN at flat index 1, which is not finite in f64"
        );
        // Finite in f64, infinite in f32: fine as f64, refused as f32.
        let big = file_with(&spec, RawTensor::of("layers.0.bias", &[2], &[1e300, 0.0]));
        assert!(Model::<f64>::from_bytes(&big, path, None).is_ok());
        let msg = Model::<f32>::from_bytes(&big, path, None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("1e300") && msg.contains("not finite in f32"),
            "{msg}"
        );
    }
}
