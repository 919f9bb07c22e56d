//! Seeds derived from the run seed, one stream per purpose.

/// Init of the pretrained teacher.
pub fn teacher_init(seed: u64) -> u64 {
    seed ^ 0x7eac_4e12_0000_0001
}

/// Batches of teacher pretraining.
pub fn teacher_batches(seed: u64) -> u64 {
    seed ^ 0x7eac_4e12_0000_0002
}

/// Init of the student (and of the baseline: the same).
pub fn student_init(seed: u64) -> u64 {
    seed ^ 0x5700_de17_0000_0003
}

/// Batches of the student (and of the baseline: the same).
pub fn student_batches(seed: u64) -> u64 {
    seed ^ 0x5700_de17_0000_0004
}

/// Samples of on-policy steps (mixed with the step and micro-batch, see
/// [`crate::assemble::OnPolicyPlan::sample_seed`]).
pub fn on_policy_samples(seed: u64) -> u64 {
    seed ^ 0x5700_de17_0000_0005
}

/// Samples of the generation evaluation (the same for every model of the run).
pub fn generation_eval(seed: u64) -> u64 {
    seed ^ 0xe7a1_9e7e_0000_0006
}
