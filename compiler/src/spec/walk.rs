//! Structural checking of a spec's JSON: walks a [`serde_json::Value`], builds the
//! [`FlowSpec`] and reports every unknown field, wrong type, missing field and
//! unknown enum string at its exact JSON pointer. Where a value is unusable a
//! placeholder is put in its place so that the walk (and the semantic checks of
//! the rest of the spec) can go on.

use serde_json::{Map, Value};

use super::errors::{escape_token, SpecError};
use super::{
    ActnormSpec, AdamSpec, AffineCouplingSpec, Augment, ConvSpec, FlowSpec, GecoSpec, GradientMode,
    InputSpec, Lambda, LayerSpec, LinearInit, LinearSpec, ObjectiveSpec, OptimizerSpec, Preprocess,
    ReconTrains, SmoothLeakyReluSpec, SplineSpec, SplitSpec, SqueezeSpec, TrainSpec,
    DEFAULT_LOGIT_ALPHA,
};

type Obj = Map<String, Value>;

const FLOW_FIELDS: &[&str] = &["name", "input", "layers", "objective", "train"];
const INPUT_FIELDS: &[&str] = &["shape", "preprocess", "logit_alpha"];
const LINEAR_FIELDS: &[&str] = &["bias", "init"];
const SLRELU_FIELDS: &[&str] = &["alpha"];
const OBJECTIVE_FIELDS: &[&str] = &["gradient", "lambda", "recon_trains"];
const TRAIN_FIELDS: &[&str] = &[
    "batch_size",
    "epochs",
    "warmup_epochs",
    "seed",
    "optimizer",
    "grad_clip_norm",
    "augment",
];
const AUGMENT: &[(&str, Augment)] = &[
    ("none", Augment::None),
    ("pad_crop", Augment::PadCrop),
    ("hflip", Augment::Hflip),
    ("hflip_pad_crop", Augment::HflipPadCrop),
];
const OPTIMIZER_FIELDS: &[&str] = &["adam"];
const ADAM_FIELDS: &[&str] = &["lr", "betas", "eps", "inverse_lr_scale"];

/// Every layer `type` a spec may name.
pub const LAYER_TYPES: &[&str] = &[
    "linear",
    "smooth_leaky_relu",
    "conv",
    "squeeze",
    "spline",
    "actnorm",
    "affine_coupling",
    "split",
    "repeat",
];
const REPEAT_FIELDS: &[&str] = &["times", "layers"];
/// The most layers a spec may expand to (through `repeat`): far beyond any flow of the paper
/// (ImageNet Glow: 3 × 48 steps of 3 layers), small enough that a typo cannot exhaust memory.
pub const MAX_LAYERS: usize = 100_000;
const SPLINE_FIELDS: &[&str] = &["bins", "tail_bound"];
const CONV_FIELDS: &[&str] = &["kernel_size", "bias"];
const PREPROCESS: &[(&str, Preprocess)] = &[
    ("dequantize_logit", Preprocess::DequantizeLogit),
    ("none", Preprocess::None),
];
const GRADIENT: &[(&str, GradientMode)] = &[
    ("self_normalizing", GradientMode::SelfNormalizing),
    ("exact", GradientMode::Exact),
];
const RECON_TRAINS: &[(&str, ReconTrains)] = &[
    ("both", ReconTrains::Both),
    ("inverse", ReconTrains::Inverse),
];
const LINEAR_INIT: &[(&str, LinearInit)] = &[
    ("identity_noise", LinearInit::IdentityNoise),
    ("identity", LinearInit::Identity),
];

/// What the walk of a document gives: the (possibly placeholder-filled) spec, the structural
/// errors in document order, and for each layer of the spec (after `repeat` expansion) the JSON
/// pointer it was written at and its JSON text.
pub(crate) struct Walked {
    pub spec: FlowSpec,
    pub errors: Vec<SpecError>,
    pub layer_paths: Vec<String>,
    pub layer_values: Vec<Value>,
}

/// Walks the whole document.
pub(crate) fn walk_flow(value: &Value) -> Walked {
    let mut w = Walker {
        errors: Vec::new(),
        layer_paths: Vec::new(),
        layer_values: Vec::new(),
    };
    let spec = w.flow(value);
    Walked {
        spec,
        errors: w.errors,
        layer_paths: w.layer_paths,
        layer_values: w.layer_values,
    }
}

fn child(p: &str, key: &str) -> String {
    format!("{p}/{}", escape_token(key))
}

fn index(p: &str, i: usize) -> String {
    format!("{p}/{i}")
}

/// Short description of a JSON value for "expected X, got Y" messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(a) => format!("an array of {} element(s)", a.len()),
        Value::Object(_) => "an object".to_string(),
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// " (did you mean `x`?)" when some candidate is close to `got`, else "".
fn suggestion(got: &str, candidates: &[&str]) -> String {
    let limit = (got.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(&got.to_lowercase(), c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

struct Walker {
    errors: Vec<SpecError>,
    /// Per expanded layer: where it is written, and its JSON.
    layer_paths: Vec<String>,
    layer_values: Vec<Value>,
}

impl Walker {
    fn err(&mut self, pointer: String, message: String) {
        self.errors.push(SpecError::new(pointer, message));
    }

    fn type_err(&mut self, pointer: String, expected: &str, got: &Value) {
        let message = format!("invalid type: expected {expected}, got {}", describe(got));
        self.err(pointer, message);
    }

    fn object<'v>(&mut self, v: &'v Value, p: &str) -> Option<&'v Obj> {
        let o = v.as_object();
        if o.is_none() {
            self.type_err(p.to_string(), "an object", v);
        }
        o
    }

    /// Reports every key of `o` not in `known`.
    fn unknown_fields(&mut self, o: &Obj, p: &str, known: &[&str], skip: &[&str]) {
        for key in o.keys() {
            if known.contains(&key.as_str()) || skip.contains(&key.as_str()) {
                continue;
            }
            let message = format!(
                "unknown field `{key}`, expected one of: {}{}",
                known.join(", "),
                suggestion(key, known)
            );
            self.err(child(p, key), message);
        }
    }

    fn required<'v>(&mut self, o: &'v Obj, p: &str, key: &str) -> Option<&'v Value> {
        let v = o.get(key);
        if v.is_none() {
            self.err(child(p, key), format!("missing field `{key}`"));
        }
        v
    }

    /// An optional field: `default` when absent, `convert`ed when present, and
    /// `default` (after an error) when present but unusable.
    fn optional<T>(
        &mut self,
        o: &Obj,
        p: &str,
        key: &str,
        default: T,
        convert: impl FnOnce(&mut Self, &Value, &str) -> Option<T>,
    ) -> T {
        match o.get(key) {
            None => default,
            Some(v) => convert(self, v, &child(p, key)).unwrap_or(default),
        }
    }

    fn u64(&mut self, v: &Value, p: &str) -> Option<u64> {
        let n = v.as_u64();
        if n.is_none() {
            self.type_err(p.to_string(), "a non-negative integer", v);
        }
        n
    }

    fn usize(&mut self, v: &Value, p: &str) -> Option<usize> {
        let n = self.u64(v, p)?;
        match usize::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.err(p.to_string(), format!("integer {n} is too large"));
                None
            }
        }
    }

    fn f64(&mut self, v: &Value, p: &str) -> Option<f64> {
        let x = v.as_f64();
        if x.is_none() {
            self.type_err(p.to_string(), "a number", v);
        }
        x
    }

    fn bool(&mut self, v: &Value, p: &str) -> Option<bool> {
        let b = v.as_bool();
        if b.is_none() {
            self.type_err(p.to_string(), "a boolean", v);
        }
        b
    }

    fn str<'v>(&mut self, v: &'v Value, p: &str) -> Option<&'v str> {
        let s = v.as_str();
        if s.is_none() {
            self.type_err(p.to_string(), "a string", v);
        }
        s
    }

    /// One of a fixed set of strings.
    fn choice<T: Copy>(
        &mut self,
        v: &Value,
        p: &str,
        what: &str,
        variants: &[(&str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
        let Some(s) = v.as_str() else {
            let expected = format!("a string (one of: {})", names.join(", "));
            self.type_err(p.to_string(), &expected, v);
            return None;
        };
        let found = variants.iter().find(|(n, _)| *n == s).map(|(_, t)| *t);
        if found.is_none() {
            let message = format!(
                "unknown {what} `{s}`, expected one of: {}{}",
                names.join(", "),
                suggestion(s, &names)
            );
            self.err(p.to_string(), message);
        }
        found
    }

    fn flow(&mut self, v: &Value) -> FlowSpec {
        let mut spec = FlowSpec {
            name: String::new(),
            input: placeholder_input(),
            layers: Vec::new(),
            objective: ObjectiveSpec::default(),
            train: TrainSpec::default(),
        };
        let Some(o) = v.as_object() else {
            self.type_err(String::new(), "a JSON object (the flow spec)", v);
            return spec;
        };
        let p = "";
        self.unknown_fields(o, p, FLOW_FIELDS, &[]);
        if let Some(name) = self.required(o, p, "name") {
            if let Some(s) = self.str(name, "/name") {
                spec.name = s.to_string();
            }
        }
        if let Some(input) = self.required(o, p, "input") {
            spec.input = self.input(input, "/input");
        }
        if let Some(layers) = self.required(o, p, "layers") {
            spec.layers = self.layers(layers, "/layers");
        }
        spec.objective = self.optional(o, p, "objective", ObjectiveSpec::default(), |w, v, p| {
            Some(w.objective(v, p))
        });
        spec.train = self.optional(o, p, "train", TrainSpec::default(), |w, v, p| {
            Some(w.train(v, p))
        });
        spec
    }

    fn input(&mut self, v: &Value, p: &str) -> InputSpec {
        let mut input = placeholder_input();
        let Some(o) = self.object(v, p) else {
            return input;
        };
        self.unknown_fields(o, p, INPUT_FIELDS, &[]);
        if let Some(shape) = self.required(o, p, "shape") {
            input.shape = self.shape(shape, &child(p, "shape"));
        }
        if let Some(pre) = self.required(o, p, "preprocess") {
            if let Some(pre) = self.choice(pre, &child(p, "preprocess"), "preprocess", PREPROCESS) {
                input.preprocess = pre;
            }
        }
        input.logit_alpha = self.optional(o, p, "logit_alpha", DEFAULT_LOGIT_ALPHA, Self::f64);
        input
    }

    fn shape(&mut self, v: &Value, p: &str) -> Vec<usize> {
        let Some(a) = v.as_array() else {
            self.type_err(p.to_string(), "an array of dimension sizes", v);
            return Vec::new();
        };
        a.iter()
            .enumerate()
            // An unusable entry becomes 1 so that it adds no range error of its own.
            .map(|(i, d)| self.usize(d, &index(p, i)).unwrap_or(1))
            .collect()
    }

    /// The layers of an array, `repeat` blocks expanded in place (recording each layer's
    /// pointer and JSON in `layer_paths` / `layer_values`).
    fn layers(&mut self, v: &Value, p: &str) -> Vec<LayerSpec> {
        let Some(a) = v.as_array() else {
            self.type_err(p.to_string(), "an array of layers", v);
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, l) in a.iter().enumerate() {
            let at = index(p, i);
            if l.get("type").and_then(Value::as_str) == Some("repeat") {
                self.repeat(l, &at, &mut out);
                continue;
            }
            let layer = self
                .layer(l, &at)
                .unwrap_or_else(|| LayerSpec::Linear(LinearSpec::default()));
            out.push(layer);
            self.layer_paths.push(at);
            self.layer_values.push(l.clone());
        }
        out
    }

    /// `{"type": "repeat", "times": n, "layers": [...]}`: the inner layers (walked once, so
    /// each problem is reported once) `n` times over.
    fn repeat(&mut self, v: &Value, p: &str, out: &mut Vec<LayerSpec>) {
        let Some(o) = self.object(v, p) else { return };
        self.unknown_fields(o, p, REPEAT_FIELDS, &["type"]);
        let times = self
            .required(o, p, "times")
            .and_then(|t| self.usize(t, &child(p, "times")));
        if times == Some(0) {
            self.err(
                child(p, "times"),
                "times must be at least 1 (the number of copies of `layers`)".into(),
            );
        }
        let Some(inner) = self.required(o, p, "layers") else {
            return;
        };
        let (paths, values) = (self.layer_paths.len(), self.layer_values.len());
        let body = self.layers(inner, &child(p, "layers"));
        if body.is_empty() && inner.is_array() {
            self.err(
                child(p, "layers"),
                "layers of a repeat must not be empty".into(),
            );
        }
        let body_paths = self.layer_paths.split_off(paths);
        let body_values = self.layer_values.split_off(values);
        // An empty body adds nothing, however many times (and looping `times` times over
        // nothing would hang on a huge count).
        if body.is_empty() {
            return;
        }
        let times = times.unwrap_or(1).max(1);
        let total = times
            .checked_mul(body.len())
            .and_then(|n| n.checked_add(out.len()));
        if total.is_none_or(|n| n > MAX_LAYERS) {
            self.err(
                child(p, "times"),
                format!(
                    "{times} copies of {} layers make more than {MAX_LAYERS} layers",
                    body.len()
                ),
            );
            return;
        }
        for _ in 0..times {
            out.extend(body.iter().cloned());
            self.layer_paths.extend(body_paths.iter().cloned());
            self.layer_values.extend(body_values.iter().cloned());
        }
    }

    fn layer(&mut self, v: &Value, p: &str) -> Option<LayerSpec> {
        let o = self.object(v, p)?;
        let Some(ty) = o.get("type") else {
            let message = format!(
                "missing field `type` (the layer type, one of: {})",
                LAYER_TYPES.join(", ")
            );
            self.err(child(p, "type"), message);
            return None;
        };
        let ty_p = child(p, "type");
        let Some(ty) = ty.as_str() else {
            let expected = format!("a string (one of: {})", LAYER_TYPES.join(", "));
            self.type_err(ty_p, &expected, ty);
            return None;
        };
        match ty {
            "linear" => {
                self.unknown_fields(o, p, LINEAR_FIELDS, &["type"]);
                let d = LinearSpec::default();
                let bias = self.optional(o, p, "bias", d.bias, Self::bool);
                let init = self.optional(o, p, "init", d.init, |w, v, p| {
                    w.choice(v, p, "init", LINEAR_INIT)
                });
                Some(LayerSpec::Linear(LinearSpec { bias, init }))
            }
            "smooth_leaky_relu" => {
                self.unknown_fields(o, p, SLRELU_FIELDS, &["type"]);
                let d = SmoothLeakyReluSpec::default();
                let alpha = self.optional(o, p, "alpha", d.alpha, Self::f64);
                Some(LayerSpec::SmoothLeakyRelu(SmoothLeakyReluSpec { alpha }))
            }
            "conv" => {
                self.unknown_fields(o, p, CONV_FIELDS, &["type"]);
                let kernel_size = match o.get("kernel_size") {
                    Some(v) => self.usize(v, &child(p, "kernel_size")).unwrap_or(1),
                    None => {
                        self.err(
                            child(p, "kernel_size"),
                            "missing field `kernel_size` (odd, e.g. 3)".into(),
                        );
                        1
                    }
                };
                let bias = self.optional(o, p, "bias", true, Self::bool);
                Some(LayerSpec::Conv(ConvSpec { kernel_size, bias }))
            }
            "spline" => {
                self.unknown_fields(o, p, SPLINE_FIELDS, &["type"]);
                let d = SplineSpec::default();
                let bins = self.optional(o, p, "bins", d.bins, Self::usize);
                let tail_bound = self.optional(o, p, "tail_bound", d.tail_bound, Self::f64);
                Some(LayerSpec::Spline(SplineSpec { bins, tail_bound }))
            }
            "squeeze" => {
                self.unknown_fields(o, p, &[], &["type"]);
                Some(LayerSpec::Squeeze(SqueezeSpec {}))
            }
            "actnorm" => {
                self.unknown_fields(o, p, &[], &["type"]);
                Some(LayerSpec::Actnorm(ActnormSpec {}))
            }
            "split" => {
                self.unknown_fields(o, p, &[], &["type"]);
                Some(LayerSpec::Split(SplitSpec {}))
            }
            "affine_coupling" => {
                self.unknown_fields(o, p, &["width"], &["type"]);
                let width = match o.get("width") {
                    Some(v) => self.usize(v, &child(p, "width")).unwrap_or(1),
                    None => {
                        self.err(
                            child(p, "width"),
                            "missing field `width` (hidden channels of the coupling network, e.g. 512)"
                                .into(),
                        );
                        1
                    }
                };
                Some(LayerSpec::AffineCoupling(AffineCouplingSpec { width }))
            }
            other => {
                let message = format!(
                    "unknown layer type `{other}`, expected one of: {}{}",
                    LAYER_TYPES.join(", "),
                    suggestion(other, LAYER_TYPES)
                );
                self.err(ty_p, message);
                None
            }
        }
    }

    fn objective(&mut self, v: &Value, p: &str) -> ObjectiveSpec {
        let d = ObjectiveSpec::default();
        let Some(o) = self.object(v, p) else {
            return d;
        };
        self.unknown_fields(o, p, OBJECTIVE_FIELDS, &[]);
        ObjectiveSpec {
            gradient: self.optional(o, p, "gradient", d.gradient, |w, v, p| {
                w.choice(v, p, "gradient mode", GRADIENT)
            }),
            lambda: self.optional(o, p, "lambda", d.lambda, Self::lambda),
            recon_trains: self.optional(o, p, "recon_trains", d.recon_trains, |w, v, p| {
                w.choice(v, p, "reconstruction target", RECON_TRAINS)
            }),
        }
    }

    /// `lambda`: a number, or `{"geco": {"lambda0", "lr", "ema", "kappa", "min", "max"}}`.
    fn lambda(&mut self, v: &Value, p: &str) -> Option<Lambda> {
        if let Some(x) = v.as_f64() {
            return Some(Lambda::Fixed(x));
        }
        let Some(o) = v.as_object() else {
            self.type_err(p.to_string(), "a number or an object {\"geco\": {...}}", v);
            return None;
        };
        self.unknown_fields(o, p, &["geco"], &[]);
        let g = self.required(o, p, "geco")?;
        let gp = child(p, "geco");
        let go = self.object(g, &gp)?;
        self.unknown_fields(
            go,
            &gp,
            &["lambda0", "lr", "ema", "kappa", "min", "max"],
            &[],
        );
        let d = GecoSpec::default();
        Some(Lambda::Geco {
            geco: GecoSpec {
                lambda0: self.optional(go, &gp, "lambda0", d.lambda0, Self::f64),
                lr: self.optional(go, &gp, "lr", d.lr, Self::f64),
                ema: self.optional(go, &gp, "ema", d.ema, Self::f64),
                kappa: self.optional(go, &gp, "kappa", d.kappa, Self::f64),
                min: self.optional(go, &gp, "min", None, |w, v, p| w.f64(v, p).map(Some)),
                max: self.optional(go, &gp, "max", None, |w, v, p| w.f64(v, p).map(Some)),
            },
        })
    }

    fn train(&mut self, v: &Value, p: &str) -> TrainSpec {
        let d = TrainSpec::default();
        let Some(o) = self.object(v, p) else {
            return d;
        };
        self.unknown_fields(o, p, TRAIN_FIELDS, &[]);
        TrainSpec {
            batch_size: self.optional(o, p, "batch_size", d.batch_size, Self::usize),
            epochs: self.optional(o, p, "epochs", d.epochs, Self::usize),
            warmup_epochs: self.optional(o, p, "warmup_epochs", d.warmup_epochs, Self::usize),
            seed: self.optional(o, p, "seed", d.seed, Self::u64),
            optimizer: self.optional(o, p, "optimizer", d.optimizer, |w, v, p| {
                Some(w.optimizer(v, p))
            }),
            grad_clip_norm: self.optional(o, p, "grad_clip_norm", None, |w, v, p| {
                w.f64(v, p).map(Some)
            }),
            augment: self.optional(o, p, "augment", d.augment, |w, v, p| {
                w.choice(v, p, "augmentation", AUGMENT)
            }),
        }
    }

    fn optimizer(&mut self, v: &Value, p: &str) -> OptimizerSpec {
        let d = OptimizerSpec::default();
        let Some(o) = self.object(v, p) else {
            return d;
        };
        self.unknown_fields(o, p, OPTIMIZER_FIELDS, &[]);
        OptimizerSpec {
            adam: self.optional(o, p, "adam", d.adam, |w, v, p| Some(w.adam(v, p))),
        }
    }

    fn adam(&mut self, v: &Value, p: &str) -> AdamSpec {
        let d = AdamSpec::default();
        let Some(o) = self.object(v, p) else {
            return d;
        };
        self.unknown_fields(o, p, ADAM_FIELDS, &[]);
        AdamSpec {
            lr: self.optional(o, p, "lr", d.lr, Self::f64),
            betas: self.optional(o, p, "betas", d.betas, Self::betas),
            eps: self.optional(o, p, "eps", d.eps, Self::f64),
            inverse_lr_scale: self.optional(
                o,
                p,
                "inverse_lr_scale",
                d.inverse_lr_scale,
                Self::f64,
            ),
        }
    }

    fn betas(&mut self, v: &Value, p: &str) -> Option<[f64; 2]> {
        let Some(a) = v.as_array() else {
            self.type_err(p.to_string(), "an array of 2 numbers", v);
            return None;
        };
        if a.len() != 2 {
            self.type_err(p.to_string(), "an array of 2 numbers", v);
            return None;
        }
        // An unusable entry gets its default so that the other one is still range-checked.
        let d = AdamSpec::default().betas;
        let b0 = self.f64(&a[0], &index(p, 0)).unwrap_or(d[0]);
        let b1 = self.f64(&a[1], &index(p, 1)).unwrap_or(d[1]);
        Some([b0, b1])
    }
}

/// Stands in for a missing or unusable `input`.
fn placeholder_input() -> InputSpec {
    InputSpec {
        shape: Vec::new(),
        preprocess: Preprocess::None,
        logit_alpha: DEFAULT_LOGIT_ALPHA,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("lrr", "lr"), 1);
        assert_eq!(edit_distance("biass", "bias"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn an_empty_repeat_of_any_count_is_one_error_at_once() {
        let json = r#"{"name": "x", "input": {"shape": [4], "preprocess": "none"},
            "layers": [{"type": "linear"},
                       {"type": "repeat", "times": 18446744073709551615, "layers": []}]}"#;
        let start = std::time::Instant::now();
        let e = crate::spec::parse_spec(json).unwrap_err();
        assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
        assert!(e.has("/layers/1/layers"), "{e}");
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggestion("lrr", ADAM_FIELDS), " (did you mean `lr`?)");
        assert_eq!(suggestion("zzzzzz", ADAM_FIELDS), "");
    }
}
