//! A short run of the fuzzer (`runtime/examples/fuzz/`) with a fixed seed: every reader
//! survives 3,000 mutated files of its kind without a panic.

#[path = "../examples/fuzz/driver.rs"]
mod driver;

#[test]
fn readers_survive_3000_mutated_files() {
    // A panicking input is written to target/fuzz-crashes/, as by the example.
    let report = driver::run(3_000, 20_261_129, &driver::crash_dir(), &|_, _| {});
    println!("{}", report.summary());
    assert_eq!(report.panics(), 0, "{}", report.summary());
    assert_eq!(report.inputs, 3_000);
    for (target, c) in &report.counts {
        assert_eq!(c.inputs, 600, "{}", target.name());
        // The mutations must reach past the first check: some inputs of every kind are still
        // valid, most are not.
        assert!(c.accepted > 0, "{}: nothing accepted", target.name());
        assert!(
            c.rejected > c.inputs / 4,
            "{}: too little rejected",
            target.name()
        );
    }
}
