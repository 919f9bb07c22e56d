//! Every built-in kind is registered through inventory and reachable from the host.

#[test]
fn builtins_are_registered() {
    let r = retort_host::builtin_registry().expect("registry");
    let kinds = |k: Vec<&str>| k.join(" ");
    assert_eq!(
        kinds(r.losses.kinds()),
        "attention ce contrastive hidden_cosine hidden_mse jsd kl layerwise reverse_kl sampled_reverse_kl skew_kl topk_kl tvd"
    );
    assert_eq!(kinds(r.students.kinds()), "llama transformer");
    assert_eq!(kinds(r.teachers.kinds()), "cached llama transformer");
    assert_eq!(kinds(r.data.kinds()), "jsonl synthetic text tokens");
    assert_eq!(kinds(r.routers.kinds()), "curriculum magnitude static student_aware");
    assert_eq!(kinds(r.tokenizers.kinds()), "char hf");
    assert_eq!(kinds(r.observers.kinds()), "jsonl");
    assert_eq!(
        kinds(r.schedules.kinds()),
        "constant cosine exponential linear piecewise step warmup_cosine"
    );
    for k in r.listing() {
        assert!(!k.description.is_empty(), "{} has no description", k.kind);
        assert_eq!(k.source, "built-in");
        let schema = (k.params)();
        assert_eq!(schema["type"], "object", "{} {}: {schema}", k.category, k.kind);
    }
}
