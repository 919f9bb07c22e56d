//! Factories and the one registry.
//!
//! Built-ins register a [`Factory`] per kind with `inventory::submit!`; the host copies them,
//! and factories registered by dynamically loaded plugins, into one [`Registry`]. An unknown kind
//! is an error listing the known kinds; a duplicate kind is an error naming both sources.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Device;

use crate::{
    DataSource, Error, LossTerm, ModelInfo, Observer, Params, Result, Router, Schedule, Student, Teacher, Tokenizer,
};

/// Builds one plugin of kind `kind` from its parameters.
pub struct Factory<T: ?Sized + 'static> {
    /// The kind name used in configs (`kind = "kl"`).
    pub kind: &'static str,
    /// One line saying what it does.
    pub description: &'static str,
    /// Constructor.
    pub build: fn(&Params, &BuildContext) -> Result<Box<T>>,
    /// JSON Schema of the parameters (types, defaults, descriptions): [`params_schema`] of the
    /// kind's params struct, or [`no_params`].
    pub params: fn() -> serde_json::Value,
}

/// The JSON Schema of a params struct `T` (derive `schemars::JsonSchema` on it).
pub fn params_schema<T: schemars::JsonSchema>() -> serde_json::Value {
    schemars::schema_for!(T).to_value()
}

/// The schema of a kind without parameters.
pub fn no_params() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false})
}

impl<T: ?Sized + 'static> Clone for Factory<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized + 'static> Copy for Factory<T> {}

/// What a factory may use besides its parameters.
#[derive(Clone)]
pub struct BuildContext<'a> {
    /// Device the run computes on.
    pub device: Device,
    /// Seed of the run; plugins derive their own streams from it.
    pub seed: u64,
    /// Vocabulary size of the data's tokenizer, once known.
    pub vocab_size: Option<usize>,
    /// Run directory, when there is one (observers write here).
    pub run_dir: Option<PathBuf>,
    /// Text from which a tokenizer that learns its vocabulary builds it.
    pub corpus: Option<&'a str>,
    /// The registry, for components that build sub-components (a data source its tokenizer,
    /// a term its schedules).
    pub registry: &'a Registry,
    /// The student's shape, once known (loss terms size projections by it).
    pub student: Option<ModelInfo>,
    /// The teacher's shape, once known.
    pub teacher: Option<ModelInfo>,
    /// `Some(k)` when the teacher provides only its top-`k` distribution, no dense logits
    /// (see [`crate::Teacher::sparse_topk`]); logit terms that can work from it adapt.
    pub teacher_topk: Option<usize>,
}

impl<'a> BuildContext<'a> {
    /// A context on `device` with `seed`, nothing else known yet.
    pub fn new(registry: &'a Registry, device: Device, seed: u64) -> Self {
        BuildContext {
            device,
            seed,
            vocab_size: None,
            run_dir: None,
            corpus: None,
            registry,
            student: None,
            teacher: None,
            teacher_topk: None,
        }
    }

    /// Student and teacher shapes, or an error for the component at `path` that needs them.
    pub fn require_models(&self, path: &str) -> Result<(ModelInfo, ModelInfo)> {
        match (self.student, self.teacher) {
            (Some(s), Some(t)) => Ok((s, t)),
            _ => Err(Error::config(
                path,
                "this component needs the student and teacher shapes, not known here",
            )),
        }
    }

    /// The vocabulary size, or an error for the component at `path` that needs it.
    pub fn require_vocab(&self, path: &str) -> Result<usize> {
        self.vocab_size
            .ok_or_else(|| Error::config(path, "this component needs the vocabulary size, which is not known yet"))
    }
}

/// One registered kind.
pub struct Entry<T: ?Sized + 'static> {
    /// Kind name.
    pub kind: String,
    /// One-line description.
    pub description: String,
    /// Where it came from: `built-in` or a library path.
    pub source: String,
    /// Constructor.
    pub build: fn(&Params, &BuildContext) -> Result<Box<T>>,
    /// JSON Schema of the parameters.
    pub params: fn() -> serde_json::Value,
}

/// All kinds of one category (`loss`, `router`, ...).
pub struct Category<T: ?Sized + 'static> {
    name: &'static str,
    entries: BTreeMap<String, Entry<T>>,
}

impl<T: ?Sized + 'static> Category<T> {
    fn new(name: &'static str) -> Self {
        Category {
            name,
            entries: BTreeMap::new(),
        }
    }

    /// Category name as used in messages and `retort plugins`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Registers a factory; a kind registered twice is an error naming both sources.
    pub fn register(&mut self, factory: &Factory<T>, source: &str) -> Result<()> {
        if let Some(existing) = self.entries.get(factory.kind) {
            return Err(Error::DuplicateKind {
                category: self.name,
                kind: factory.kind.to_string(),
                first: existing.source.clone(),
                second: source.to_string(),
            });
        }
        self.entries.insert(
            factory.kind.to_string(),
            Entry {
                kind: factory.kind.to_string(),
                description: factory.description.to_string(),
                source: source.to_string(),
                build: factory.build,
                params: factory.params,
            },
        );
        Ok(())
    }

    /// Registers every factory of `factories`, stopping at the first duplicate.
    fn register_all<'f>(&mut self, factories: impl IntoIterator<Item = &'f Factory<T>>, source: &str) -> Result<()> {
        for f in factories {
            self.register(f, source)?;
        }
        Ok(())
    }

    /// The entries as `retort plugins` lists them.
    fn listing(&self) -> impl Iterator<Item = KindInfo> + '_ {
        self.entries().map(|e| KindInfo {
            category: self.name,
            kind: e.kind.clone(),
            description: e.description.clone(),
            source: e.source.clone(),
            params: e.params,
        })
    }

    /// The entry for `kind`, or an error (at key path `path`) listing the known kinds.
    pub fn get(&self, kind: &str, path: &str) -> Result<&Entry<T>> {
        self.entries.get(kind).ok_or_else(|| Error::UnknownKind {
            category: self.name,
            kind: kind.to_string(),
            path: path.to_string(),
            known: self.kinds().join(", "),
            location: String::new(),
        })
    }

    /// Builds `kind` with `params`.
    pub fn build(&self, kind: &str, params: &Params, ctx: &BuildContext) -> Result<Box<T>> {
        let entry = self.get(kind, &params.key_path("kind"))?;
        (entry.build)(params, ctx)
    }

    /// Registered kind names, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// Registered entries, sorted by kind.
    pub fn entries(&self) -> impl Iterator<Item = &Entry<T>> {
        self.entries.values()
    }
}

/// Source label of factories linked into the binary.
pub const BUILTIN_SOURCE: &str = "built-in";

/// Generates, from one line per category (`field: Trait, "name", registrar_method, "what";`),
/// everything that is spelled out per category: the `inventory` collections, the [`Registry`]
/// fields, [`Registry::empty`], [`Registry::from_inventory`], [`Registry::register_plugin`],
/// [`Registry::listing`], the [`Registrar`] trait a plugin library fills, and what it fills.
///
/// The order of the lines is the order of the [`Registrar`] methods, which is part of the plugin
/// ABI (a reordering needs an sdk version bump).
macro_rules! categories {
    ($($field:ident: $trait:ident, $name:literal, $method:ident, $what:literal;)*) => {
        $(inventory::collect!(Factory<dyn $trait>);)*

        /// Every factory retort knows, by category.
        pub struct Registry {
            $(
                #[doc = concat!("The ", $what, " (category `", $name, "`).")]
                pub $field: Category<dyn $trait>,
            )*
        }

        impl Registry {
            /// An empty registry.
            pub fn empty() -> Self {
                Registry {
                    $($field: Category::new($name),)*
                }
            }

            /// A registry holding every factory submitted with `inventory` in the linked crates.
            ///
            /// The crates holding the submissions must be linked into the binary (the host calls
            /// `retort_plugins::link()` for the built-ins).
            pub fn from_inventory() -> Result<Self> {
                let mut r = Registry::empty();
                $(r.$field.register_all(inventory::iter::<Factory<dyn $trait>>, BUILTIN_SOURCE)?;)*
                Ok(r)
            }

            /// Registers everything a plugin library hands to `register`, with `source` (the
            /// library path); a kind already registered is an error naming both sources.
            pub fn register_plugin(&mut self, source: &str, register: crate::plugin::RegisterFn) -> Result<()> {
                let mut collected = Collected::default();
                register(&mut collected);
                $(self.$field.register_all(&collected.$field, source)?;)*
                Ok(())
            }

            /// Every registered kind, by category then kind.
            pub fn listing(&self) -> Vec<KindInfo> {
                let mut out = Vec::new();
                $(out.extend(self.$field.listing());)*
                out
            }
        }

        /// What a plugin library registers its kinds into (see [`crate::plugin`]).
        pub trait Registrar {
            $(
                #[doc = concat!("Registers a factory of ", $what, ".")]
                fn $method(&mut self, factory: Factory<dyn $trait>);
            )*
        }

        /// Factories handed over by one plugin library.
        #[derive(Default)]
        struct Collected {
            $($field: Vec<Factory<dyn $trait>>,)*
        }

        impl Registrar for Collected {
            $(
                fn $method(&mut self, f: Factory<dyn $trait>) {
                    self.$field.push(f);
                }
            )*
        }
    };
}

categories! {
    teachers: Teacher, "teacher", teacher, "teacher providers";
    students: Student, "student", student, "trainable student models";
    losses: LossTerm, "loss", loss, "loss terms";
    schedules: Schedule, "schedule", schedule, "schedules";
    routers: Router, "router", router, "routers";
    data: DataSource, "data", data, "data sources";
    tokenizers: Tokenizer, "tokenizer", tokenizer, "tokenizers";
    observers: Observer, "observer", observer, "metric observers";
}

/// One registered kind, as `retort plugins` shows it.
#[derive(Debug, Clone)]
pub struct KindInfo {
    /// Category (`loss`, `router`, ...).
    pub category: &'static str,
    /// Kind name.
    pub kind: String,
    /// One-line description.
    pub description: String,
    /// `built-in` or the library path.
    pub source: String,
    /// JSON Schema of its parameters.
    pub params: fn() -> serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Progress, Schedule};

    struct Half;
    impl Schedule for Half {
        fn value(&self, _p: Progress) -> f64 {
            0.5
        }
    }
    fn build_half(_: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
        Ok(Box::new(Half))
    }
    static HALF: Factory<dyn Schedule> = Factory {
        kind: "half",
        description: "always 0.5",
        build: build_half,
        params: no_params,
    };

    #[test]
    fn a_plugin_registers_through_the_registrar_and_is_listed() {
        fn register(r: &mut dyn Registrar) {
            r.schedule(HALF);
        }
        let mut r = Registry::empty();
        r.register_plugin("/tmp/libhalf.so", register).expect("register");
        let listed: Vec<(&str, String, String)> = r
            .listing()
            .into_iter()
            .map(|k| (k.category, k.kind, k.source))
            .collect();
        assert_eq!(listed, vec![("schedule", "half".into(), "/tmp/libhalf.so".into())]);
        let again = r.register_plugin("/tmp/other.so", register).expect_err("duplicate");
        assert!(again.to_string().contains("/tmp/libhalf.so"), "{again}");
    }

    #[test]
    fn duplicate_kind_names_both_sources() {
        let mut r = Registry::empty();
        r.schedules.register(&HALF, "built-in").expect("first");
        let msg = r
            .schedules
            .register(&HALF, "/tmp/libx.so")
            .expect_err("must fail")
            .to_string();
        assert!(
            msg.contains("built-in") && msg.contains("/tmp/libx.so") && msg.contains("half"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_kind_lists_known_kinds() {
        let mut r = Registry::empty();
        r.schedules.register(&HALF, "built-in").expect("register");
        let err = r
            .schedules
            .get("halve", "train.lr_schedule.kind")
            .err()
            .expect("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("`halve`") && msg.contains("known schedule kinds: half"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 2);
        let ctx = BuildContext::new(&r, Device::Cpu, 0);
        let s = r.schedules.build("half", &Params::empty("x"), &ctx).expect("build");
        assert_eq!(s.value(Progress::new(0, 1)), 0.5);
    }
}
