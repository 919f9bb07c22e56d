//! The shape of the code, checked: host's layers point one way (cli -> engine -> assemble ->
//! artifacts), no two modules of host import each other (directly or around a loop), no two
//! plugin categories do, and no function of host outside tests is longer than ~100 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module path of a file under `src` (`engine/phase/run.rs` -> `engine::phase::run`,
/// `engine/phase/mod.rs` -> `engine::phase`, `lib.rs` -> ``).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("file name");
    match last.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        f => parts.push(f.trim_end_matches(".rs").to_string()),
    }
    parts
}

/// The code of a file without comments and without its `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i64> = None;
    let mut depth = 0i64;
    let mut pending_test = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let t = code.trim();
        if t.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        if pending_test && t.starts_with("mod ") && skip_depth.is_none() {
            skip_depth = Some(depth);
        }
        pending_test = false;
        depth += code.matches('{').count() as i64 - code.matches('}').count() as i64;
        match skip_depth {
            Some(d) if depth <= d && t.ends_with('}') => skip_depth = None,
            Some(_) => {}
            None => {
                out.push_str(code);
                out.push('\n');
            }
        }
    }
    out
}

/// The code of a file without its comments.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Absolute module paths a file refers to: `crate::a::b`, `super::x`, `self::x`, including
/// the branches of grouped `use` statements (`use super::{a::X, b}`).
fn references(module: &[String], code: &str) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for path in use_paths(code).into_iter().chain(inline_paths(code)) {
        if let Some(abs) = absolute(module, &path) {
            out.insert(abs);
        }
    }
    out
}

/// The paths of every `use` statement, grouped imports expanded.
fn use_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for stmt in code.split(';') {
        let s = stmt.trim();
        let s = s.strip_prefix("pub ").unwrap_or(s);
        let s = s.strip_prefix("pub(crate) ").unwrap_or(s);
        let s = s.strip_prefix("pub(super) ").unwrap_or(s);
        if let Some(body) = s.strip_prefix("use ") {
            let flat: String = body.split_whitespace().collect();
            expand(&flat, &mut out);
        }
    }
    out
}

/// `a::{b, c::{d}}` -> `a::b`, `a::c::d`.
fn expand(s: &str, out: &mut Vec<String>) {
    let Some(open) = s.find('{') else {
        out.push(s.to_string());
        return;
    };
    let prefix = &s[..open];
    let inner = &s[open + 1..s.rfind('}').unwrap_or(s.len())];
    let mut depth = 0;
    let mut start = 0;
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&format!("{prefix}{}", &inner[start..i]), out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < inner.len() {
        expand(&format!("{prefix}{}", &inner[start..]), out);
    }
}

/// `crate::x::y` style paths written inline in code.
fn inline_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
        if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        out.push(rest[..end].trim_end_matches(':').to_string());
    }
    out
}

/// `path` as seen from `module`, made absolute; `None` for paths outside the crate.
fn absolute(module: &[String], path: &str) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> = match segs.first()? {
        &"crate" => {
            segs.remove(0);
            Vec::new()
        }
        &"super" | &"self" => module.to_vec(),
        _ => return None,
    };
    while let Some(&s) = segs.first() {
        match s {
            "super" => {
                base.pop()?;
            }
            "self" => {}
            _ => break,
        }
        segs.remove(0);
    }
    base.extend(segs.iter().map(|s| s.to_string()));
    Some(base)
}

/// The deepest module of `modules` that `path` names or lies in.
fn resolve<'a>(modules: &'a BTreeSet<Vec<String>>, path: &[String]) -> Option<&'a Vec<String>> {
    (0..=path.len()).rev().find_map(|n| modules.get(&path[..n].to_vec()))
}

/// Module-level dependency edges of the crate at `src`, test modules included (a module's use
/// of its own ancestors or descendants, e.g. a parent re-exporting its children, is not an
/// edge).
fn edges(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let files = rust_files(src);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let module = module_of(src, f);
        let code = without_comments(&std::fs::read_to_string(f).expect("read"));
        for r in references(&module, &code) {
            let Some(target) = resolve(&modules, &r) else { continue };
            let related = target.starts_with(&module) || module.starts_with(target);
            if !related {
                graph.entry(module.clone()).or_default().insert(target.clone());
            }
        }
    }
    graph
}

/// A cycle of `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    fn visit(
        n: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = stack.iter().position(|m| m == n).unwrap_or(0);
                let mut cycle = stack[at..].to_vec();
                cycle.push(n.clone());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    graph.keys().find_map(|n| visit(n, graph, &mut state, &mut Vec::new()))
}

fn show(cycle: &[Vec<String>]) -> String {
    cycle.iter().map(|m| m.join("::")).collect::<Vec<_>>().join(" -> ")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn host_layers_point_one_way() {
    let graph = edges(&root().join("host/src"));
    // What each top-level area may use (besides itself and the crate root).
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("cli", &["engine", "assemble", "artifacts"][..]),
        ("engine", &["assemble", "artifacts"][..]),
        ("assemble", &["artifacts"][..]),
        ("artifacts", &[][..]),
    ]);
    let mut wrong = Vec::new();
    for (from, targets) in &graph {
        let Some(area) = from.first() else { continue };
        let Some(ok) = allowed.get(area.as_str()) else { continue };
        for t in targets {
            let Some(to) = t.first() else { continue };
            if to != area && !ok.contains(&to.as_str()) {
                wrong.push(format!("{} -> {}", from.join("::"), t.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
}

#[test]
fn no_two_modules_of_host_import_each_other() {
    let graph = edges(&root().join("host/src"));
    assert!(graph.len() > 20, "the module graph looks empty: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in host: {}", show(&cycle));
    }
}

#[test]
fn no_two_plugin_categories_import_each_other() {
    let graph = edges(&root().join("plugins/src"));
    // Aggregate to categories: the first segment of each module path. `testing` (fixtures of
    // tests: tiny GGUF models, finite differences) builds on the categories and every test may
    // use it, so uses of it are not edges.
    let mut categories: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (from, targets) in &graph {
        let Some(a) = from.first() else { continue };
        for t in targets {
            let Some(b) = t.first() else { continue };
            if a != b && b != "testing" {
                categories.entry(vec![a.clone()]).or_default().insert(vec![b.clone()]);
            }
        }
    }
    if let Some(cycle) = find_cycle(&categories) {
        panic!("import cycle between plugin categories: {}", show(&cycle));
    }
}

/// `(file, line, name, length)` of every function in `code` longer than `max` lines.
fn long_functions(file: &Path, code: &str, max: usize) -> Vec<(String, usize, String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let is_fn = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "unsafe fn ",
            "pub unsafe fn ",
        ]
        .iter()
        .any(|p| t.starts_with(p));
        if !is_fn {
            continue;
        }
        let name = t
            .split("fn ")
            .nth(1)
            .unwrap_or("")
            .split(['(', '<'])
            .next()
            .unwrap_or("")
            .to_string();
        let mut depth = 0i64;
        let mut opened = false;
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !opened && j > i && l.trim_end().ends_with(';') && !l.contains('{') && depth == 0 {
                break; // a declaration without a body
            }
            depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
            opened |= l.contains('{');
            if opened && depth <= 0 {
                if j - i + 1 > max {
                    out.push((file.display().to_string(), i + 1, name.clone(), j - i + 1));
                }
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_of_host_is_longer_than_a_hundred_lines() {
    let src = root().join("host/src");
    let mut long = Vec::new();
    for f in rust_files(&src) {
        let code = code_of(&std::fs::read_to_string(&f).expect("read"));
        long.extend(long_functions(&f, &code, 100));
    }
    assert!(long.is_empty(), "functions over 100 lines: {long:#?}");
}

#[test]
fn the_checks_see_what_they_check() {
    // A cycle and a long function are found where they exist.
    let mut g = BTreeMap::new();
    let (a, b) = (vec!["a".to_string()], vec!["b".to_string()]);
    g.insert(a.clone(), BTreeSet::from([b.clone()]));
    g.insert(b.clone(), BTreeSet::from([a.clone()]));
    assert!(find_cycle(&g).is_some());
    let body = format!("fn big() {{\n{}}}\n", "    let x = 1;\n".repeat(120));
    assert_eq!(long_functions(Path::new("x.rs"), &body, 100).len(), 1);
    let mut out = Vec::new();
    expand("super::{ema::Ema,gradient::{Gradient,Objective}}", &mut out);
    assert_eq!(
        out,
        [
            "super::ema::Ema",
            "super::gradient::Gradient",
            "super::gradient::Objective"
        ]
    );
    let module = vec!["engine".to_string(), "phase".to_string(), "run".to_string()];
    assert_eq!(
        absolute(&module, "super::ema::Ema"),
        Some(vec!["engine".into(), "phase".into(), "ema".into(), "Ema".into()])
    );
    assert!(code_of("fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() {}\n}\n").contains("fn a"));
    assert!(!code_of("fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() {}\n}\n").contains("fn b"));
}
