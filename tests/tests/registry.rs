//! Every built-in kind is registered through inventory and reachable from the host.

#[test]
fn builtins_are_registered() {
    let r = retort_host::builtin_registry().expect("registry");
    assert_eq!(
        r.losses.kinds(),
        vec![
            "attention",
            "ce",
            "contrastive",
            "hidden_cosine",
            "hidden_mse",
            "jsd",
            "kl",
            "layerwise",
            "reverse_kl",
            "skew_kl",
            "tvd"
        ]
    );
    assert_eq!(r.students.kinds(), vec!["transformer"]);
    assert_eq!(r.teachers.kinds(), vec!["transformer"]);
    assert_eq!(r.data.kinds(), vec!["synthetic", "text"]);
    assert_eq!(r.routers.kinds(), vec!["curriculum", "magnitude", "static"]);
    assert_eq!(r.tokenizers.kinds(), vec!["char"]);
    assert_eq!(r.observers.kinds(), vec!["jsonl"]);
    assert_eq!(
        r.schedules.kinds(),
        vec![
            "constant",
            "cosine",
            "exponential",
            "linear",
            "piecewise",
            "step",
            "warmup_cosine"
        ]
    );
    for (_, kind, description, source) in r.listing() {
        assert!(!description.is_empty(), "{kind} has no description");
        assert_eq!(source, "built-in");
    }
}
