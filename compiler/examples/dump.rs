use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::parse_spec;
fn main() {
    let path = std::env::args().nth(1).expect("spec");
    let text = std::fs::read_to_string(&path).unwrap();
    let spec = parse_spec(&text).unwrap();
    let c = compile_train(
        &spec,
        std::env::var("B")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(100),
        if std::env::var("SUB_ONLY").is_ok() {
            OptLevel::Substitution
        } else {
            OptLevel::Full
        },
    )
    .expect("the spec compiles");
    if std::env::var("EXACT_STEP").is_ok() {
        print!("{}", c.exact.without_outputs(&["objective"]).to_text());
        return;
    }
    if std::env::args().nth(2).is_some() {
        print!("{}", c.exact.to_text());
        print!("{}", c.step.to_text());
    }
    println!("exact {:?}", op_counts(&c.exact));
    println!("step {:?}", op_counts(&c.step));
    println!("{:?}", c.egraph);
}
