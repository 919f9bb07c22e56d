//! The selftest through the library: on the CPU every op family of `kernels/` is checked in
//! f32 and f64, values and gradients, every case passes, and the report serialises to the JSON
//! `retort selftest --json` prints.

use candle_core::Device;
use retort_plugins::kernels::selftest::{op_names, run, SelftestOptions, Status};

#[test]
fn every_fused_op_passes_against_its_reference_on_the_cpu() {
    let report = run(&Device::Cpu, &SelftestOptions::default()).expect("selftest");
    let not_passed: Vec<String> = report
        .cases
        .iter()
        .filter(|c| c.status != Status::Pass)
        .map(|c| {
            format!(
                "{}: {:?} values {:?} grads {:?} {:?}",
                c.label, c.status, c.values, c.grads, c.note
            )
        })
        .collect();
    assert!(not_passed.is_empty(), "{}", not_passed.join("\n"));
    assert!(report.ok() && report.verdict().contains("PASS"), "{}", report.verdict());
    for c in &report.cases {
        assert!(!c.values.is_empty(), "{}: no value checked", c.label);
        if c.label.op != "adamw" {
            assert!(!c.grads.is_empty(), "{}: no gradient checked", c.label);
        }
        let t = c.timing.as_ref().expect("timed");
        assert!(
            t.fused_ms > 0.0 && t.fused_gb_per_s > 0.0 && t.composite_ms.is_some(),
            "{}",
            c.label
        );
    }

    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["summary"]["failed"], 0);
    let cases = json["cases"].as_array().expect("cases");
    assert_eq!(json["summary"]["passed"].as_u64(), Some(cases.len() as u64));
    let families = op_names();
    assert!(families.len() >= 11, "{families:?}");
    for family in families {
        for dtype in ["f32", "f64"] {
            let passing = cases
                .iter()
                .filter(|c| c["op"] == family && c["dtype"] == dtype && c["status"] == "pass")
                .count();
            assert!(passing >= 2, "{family} {dtype}: {passing} passing cases");
        }
    }
}

#[test]
fn a_filter_runs_only_the_ops_it_names() {
    let opts = SelftestOptions {
        filter: Some("norm".into()),
        ..Default::default()
    };
    let report = run(&Device::Cpu, &opts).expect("selftest");
    let mut ops: Vec<&str> = report.cases.iter().map(|c| c.label.op).collect();
    ops.dedup();
    assert_eq!(ops, ["layer_norm", "rms_norm"]);
}
