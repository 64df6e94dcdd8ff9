//! The IR text form read back, and rewrite file tests in the style of Cranelift's filetests.
//!
//! **Round trip.** For every spec in `specs/`, the exact training graph and the optimized step
//! print, parse and print again to the same text.
//!
//! **File tests.** Every `tests/ir/*.ir` file is one test of the rewrite phases:
//!
//! ```text
//! ; What the test is about (any number of `;` comment lines).
//! ; run: self_normalize, optimize
//! graph name {
//!   %0 = param A : [32, 32]
//!   ...
//!   output y = %5
//! }
//! ; expect:
//! graph name {
//!   ...
//! }
//! ```
//!
//! - `; run: PHASES` (exactly one such line, before `; expect:`) lists the passes applied in
//!   order, separated by commas: `self_normalize` and `optimize`, run by the pass manager that
//!   `compile` uses ([`snfc_compiler::passes::PassManager::named`]), each with
//!   `Limits::default()` and each checked to keep every output at its shape.
//! - The input is the graph in the IR text form (`Graph::from_text`; `;` lines are comments, so
//!   the whole text above `; expect:` is handed to the parser). Node numbers need only be defined
//!   before use.
//! - `; check: PROPERTY` lines (any number, before `; expect:`) assert properties of the result,
//!   as Cranelift's filetests do, so that a file says what must hold and not only what came out:
//!   `no OP` (no node of that op), `OP = N`, `OP <= N`, `OP >= N`, where OP is an op token
//!   (`matmul`, `inverse`, `toeplitz`, `conv2d`, …), `gemm` (= `matmul`), `kernels` (launches
//!   after fusion) or `nodes`. A failed check fails the file even when the text matches.
//! - Everything after the line `; expect:` is the expected result, exactly as `Graph::to_text`
//!   prints it (dense numbering; surrounding blank lines are ignored). No comments there.
//!
//! The test runs every file and fails listing each mismatch with the expected and the actual
//! text. `SNFC_BLESS=1 cargo test -p snfc-compiler --test ir_files` instead rewrites each file's
//! expected section (adding `; expect:` if missing) with the actual output: write a new test as
//! comments, a `; run:` line and the input graph, bless it, then *read* the result and check that
//! it is what the rule should produce before committing it.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::Graph;
use snfc_compiler::passes::{PassContext, PassManager};
use snfc_compiler::rewrite::Limits;
use snfc_compiler::spec::load_spec;
use std::path::{Path, PathBuf};

const EXPECT: &str = "; expect:";
const RUN: &str = "; run:";
const CHECK: &str = "; check:";

/// One `; check:` line: the measured quantity, the comparison and the bound.
#[derive(Debug, PartialEq)]
struct Check {
    text: String,
    what: String,
    cmp: &'static str,
    bound: usize,
}

fn parse_check(text: &str) -> Result<Check, String> {
    let text = text.trim();
    if let Some(what) = text.strip_prefix("no ") {
        return Ok(Check {
            text: text.to_string(),
            what: what.trim().to_string(),
            cmp: "=",
            bound: 0,
        });
    }
    for cmp in ["<=", ">=", "="] {
        if let Some((what, n)) = text.split_once(cmp) {
            let bound = n
                .trim()
                .parse()
                .map_err(|_| format!("`{CHECK} {text}`: {n:?} is not a count"))?;
            return Ok(Check {
                text: text.to_string(),
                what: what.trim().to_string(),
                cmp,
                bound,
            });
        }
    }
    Err(format!(
        "`{CHECK} {text}`: expected `no OP`, `OP = N`, `OP <= N` or `OP >= N`"
    ))
}

/// The quantity a check measures on `g`.
fn measure(g: &Graph, what: &str) -> usize {
    match what {
        "kernels" => snfc_compiler::fuse::kernel_count(g),
        "nodes" => g.node_count(),
        _ => {
            let kind = if what == "gemm" { "matmul" } else { what };
            g.nodes()
                .into_iter()
                .filter(|n| g.node(*n).op.to_string().split(':').next() == Some(kind))
                .count()
        }
    }
}

/// The checks that fail on `g`, each with what was measured.
fn failed_checks(checks: &[Check], g: &Graph) -> Vec<String> {
    checks
        .iter()
        .filter_map(|c| {
            let got = measure(g, &c.what);
            let holds = match c.cmp {
                "<=" => got <= c.bound,
                ">=" => got >= c.bound,
                _ => got == c.bound,
            };
            (!holds).then(|| format!("`{CHECK} {}` failed: {} is {got}", c.text, c.what))
        })
        .collect()
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out
}

#[track_caller]
fn assert_round_trips(g: &Graph, what: &str) {
    let text = g.to_text();
    let back = Graph::from_text(&text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"));
    assert_eq!(back.to_text(), text, "{what}: parse then print differs");
}

#[test]
fn every_spec_round_trips_through_text() {
    let specs = files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs"),
        "json",
    );
    assert!(!specs.is_empty());
    for path in specs {
        let spec = load_spec(&path).unwrap_or_else(|e| panic!("{e}"));
        let c = compile_train(&spec, spec.train.batch_size, OptLevel::Full)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_round_trips(&c.exact, &format!("{} exact", path.display()));
        assert_round_trips(&c.step, &format!("{} step", path.display()));
    }
}

/// One parsed `.ir` file.
struct FileTest {
    phases: Vec<String>,
    checks: Vec<Check>,
    /// The text handed to the parser: everything above `; expect:`.
    input: String,
    /// The expected output (`None` when the file has no `; expect:` yet).
    expected: Option<String>,
}

fn read_test(text: &str) -> Result<FileTest, String> {
    let (input, expected) = match text.find(&format!("\n{EXPECT}")) {
        Some(at) => {
            let rest = &text[at + 1 + EXPECT.len()..];
            let rest = rest
                .strip_prefix('\n')
                .or_else(|| rest.strip_prefix("\r\n"))
                .or(if rest.trim().is_empty() {
                    Some("")
                } else {
                    None
                })
                .ok_or_else(|| format!("text after `{EXPECT}` on its line"))?;
            (&text[..at + 1], Some(normalize(rest)))
        }
        None => (text, None),
    };
    let runs: Vec<&str> = input
        .lines()
        .filter_map(|l| l.trim().strip_prefix(RUN))
        .collect();
    let [run] = runs.as_slice() else {
        return Err(format!(
            "expected one `{RUN} PHASES` line above `{EXPECT}`, found {}",
            runs.len()
        ));
    };
    let phases: Vec<String> = run.split(',').map(|p| p.trim().to_string()).collect();
    let checks = input
        .lines()
        .filter_map(|l| l.trim().strip_prefix(CHECK))
        .map(parse_check)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FileTest {
        phases,
        checks,
        input: input.to_string(),
        expected,
    })
}

/// The expected text without surrounding blank lines, ending in one newline.
fn normalize(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim_end).collect();
    let first = lines.iter().position(|l| !l.is_empty());
    let last = lines.iter().rposition(|l| !l.is_empty());
    match (first, last) {
        (Some(a), Some(b)) => lines[a..=b].join("\n") + "\n",
        _ => String::new(),
    }
}

fn run_phases(t: &FileTest) -> Result<Graph, String> {
    let g = Graph::from_text(&t.input).map_err(|e| format!("input: {e}"))?;
    // The passes `compile` runs, by name; a graph from text has no spec, so only the checks
    // every pass makes (each output kept at its shape) apply.
    let passes = PassManager::named(&t.phases).map_err(|e| format!("`{RUN}`: {e}"))?;
    let cx = PassContext {
        spec: None,
        limits: Limits::default(),
    };
    passes
        .run(&g, &cx)
        .map(|(g, _)| g)
        .map_err(|e| e.to_string())
}

#[test]
fn rewrite_file_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ir");
    let paths = files(&dir, "ir");
    assert!(!paths.is_empty(), "no .ir files in {}", dir.display());
    let bless = std::env::var("SNFC_BLESS").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for path in &paths {
        let name = path.display();
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let test = match read_test(&text) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let actual = match run_phases(&test) {
            Ok(g) => {
                failures.extend(
                    failed_checks(&test.checks, &g)
                        .into_iter()
                        .map(|f| format!("{name}: {f}")),
                );
                g.to_text()
            }
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if test.expected.as_deref() == Some(actual.as_str()) {
            continue;
        }
        if bless {
            let mut input = test.input.clone();
            if !input.ends_with('\n') {
                input.push('\n');
            }
            let blessed = format!("{input}{EXPECT}\n{actual}");
            std::fs::write(path, blessed).unwrap_or_else(|e| panic!("{name}: {e}"));
            eprintln!("blessed {name}");
            continue;
        }
        let expected = test
            .expected
            .unwrap_or_else(|| format!("(no `{EXPECT}` section)\n"));
        failures.push(format!(
            "{name}: the result differs from the expected text \
             (SNFC_BLESS=1 rewrites it; check the result by reading it)\n\
             --- expected\n{expected}--- actual\n{actual}"
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} file tests failed:\n\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n")
    );
}

#[test]
fn file_format() {
    let t = read_test("; c\n; run: optimize\ngraph g {\n}\n; expect:\n\ngraph g {\n}\n\n")
        .expect("reads");
    assert_eq!(t.phases, ["optimize"]);
    assert_eq!(t.input, "; c\n; run: optimize\ngraph g {\n}\n");
    assert_eq!(t.expected.as_deref(), Some("graph g {\n}\n"));
    let t = read_test("; run: self_normalize, optimize\ngraph g {\n}\n").expect("reads");
    assert_eq!(t.phases, ["self_normalize", "optimize"]);
    assert_eq!(t.expected, None);
    assert!(read_test("graph g {\n}\n; expect:\n").is_err());
    // Checks: parsed, measured, and reported when they fail.
    let t = read_test(
        "; run: optimize\n; check: no inverse\n; check: gemm = 2\n; check: kernels <= 3\n\
         graph g {\n  %0 = param a : [2, 2]\n  %1 = matmul %0, %0 : [2, 2]\n  output y = %1\n}\n",
    )
    .expect("reads");
    assert_eq!(t.checks.len(), 3);
    assert_eq!(
        (
            t.checks[1].what.as_str(),
            t.checks[1].cmp,
            t.checks[1].bound
        ),
        ("gemm", "=", 2)
    );
    let g = run_phases(&t).expect("runs");
    assert_eq!(
        failed_checks(&t.checks, &g),
        ["`; check: gemm = 2` failed: gemm is 1"]
    );
    assert!(read_test("; run: optimize\n; check: gemm is many\ngraph g {\n}\n").is_err());
    assert!(read_test("; run: optimize\n; run: optimize\ngraph g {\n}\n").is_err());
}
