//! The code's shape (issue 21): no circle of imports inside any crate, and no function of
//! more than 80 lines outside tests.
//!
//! Every workspace crate's `src/` is parsed with `syn`. A file is a module (`a/b.rs` and
//! `a/b/mod.rs` are `a::b`); a module depends on another when it names it through
//! `crate::`, `super::` or `self::` paths or `use` trees. A module's references to its own
//! descendants are not counted (a parent declares and re-exports its children), so a
//! circle is between siblings or cousins: `nbd::server` ↔ `nbd::transmission`, or
//! `agent` → `control` → `coord::server` → `agent`.
//!
//! `cargo run -p hvm-architecture` prints what it finds; the test in `tests/` compares it
//! with `tools/architecture/baseline.txt`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::visit::Visit;

pub const MAX_FN_LINES: usize = 80;

/// The workspace this crate sits in (`tools/architecture/../..`), or `HVM_WORKSPACE`.
pub fn workspace() -> PathBuf {
    if let Some(w) = std::env::var_os("HVM_WORKSPACE") {
        return PathBuf::from(w);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tools/architecture is two levels down")
        .to_path_buf()
}

/// The `src/` directory of every workspace member.
fn crate_sources(root: &Path) -> Vec<(String, PathBuf)> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).expect("workspace Cargo.toml");
    members(&toml)
        .into_iter()
        .map(|m| (m.clone(), root.join(&m).join("src")))
        .filter(|(_, p)| p.is_dir())
        .collect()
}

/// Just enough of Cargo.toml: the `members = [...]` list.
fn members(text: &str) -> Vec<String> {
    let start = text.find("members").expect("a members list");
    let open = start + text[start..].find('[').expect("[");
    let close = open + text[open..].find(']').expect("]");
    text[open + 1..close]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A module path inside a crate, e.g. `["coord", "copy"]`.
type ModPath = Vec<String>;

fn module_of(src: &Path, file: &Path) -> Option<ModPath> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().map(String::as_str) == Some("bin") {
        // A binary is a crate of its own, using the library by name: its functions are
        // measured, its imports are not part of the library's graph.
        return Some(vec![format!("bin {}", parts.join("/"))]);
    }
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if !matches!(stem, "lib" | "main" | "mod") {
        parts.push(stem.to_string());
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn is_test_attr(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("test")
            || (a.path().is_ident("cfg")
                && matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string().trim() == "test"))
    })
}

/// What one file references and how long its functions are.
struct FileVisitor {
    module: ModPath,
    refs: BTreeSet<ModPath>,
    long_fns: Vec<(String, usize)>,
    impl_of: Option<String>,
}

impl FileVisitor {
    /// `path` made absolute from the crate root, when it starts with crate/super/self.
    fn absolute(&self, segs: &[String]) -> Option<ModPath> {
        let first = segs.first()?;
        // `super` in `a/b.rs` and in `a/b/mod.rs` (both module a::b) is `a`.
        let mut base: ModPath = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.module.clone(),
            "super" => {
                let mut m = self.module.clone();
                m.pop()?;
                m
            }
            _ => return None,
        };
        for s in &segs[1..] {
            if s == "super" {
                base.pop()?;
            } else {
                base.push(s.clone());
            }
        }
        Some(base)
    }

    fn add(&mut self, segs: Vec<String>) {
        if let Some(p) = self.absolute(&segs) {
            self.refs.insert(p);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.add(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.add(full);
            }
            syn::UseTree::Glob(_) => self.add(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// Measure a function from its `fn` keyword to the end of its body (attributes and
    /// doc comments are not counted); `item` is the whole item, when the two cannot join.
    fn function(&mut self, name: String, sig: &syn::Signature, body: &syn::Block, item: Span) {
        let span = sig.fn_token.span().join(body.span()).unwrap_or(item);
        let lines = span.end().line.saturating_sub(span.start().line) + 1;
        if lines > MAX_FN_LINES {
            self.long_fns.push((name, lines));
        }
    }
}

impl<'ast> Visit<'ast> for FileVisitor {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_attr(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_test_attr(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.add(segs);
        syn::visit::visit_path(self, p);
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if is_test_attr(&f.attrs) {
            return;
        }
        self.function(f.sig.ident.to_string(), &f.sig, &f.block, f.span());
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if is_test_attr(&i.attrs) {
            return;
        }
        let ty = match &*i.self_ty {
            syn::Type::Path(p) => p
                .path
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .unwrap_or_default(),
            _ => "_".to_string(),
        };
        let outer = self.impl_of.replace(ty);
        syn::visit::visit_item_impl(self, i);
        self.impl_of = outer;
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if is_test_attr(&f.attrs) {
            return;
        }
        let name = format!(
            "{}::{}",
            self.impl_of.clone().unwrap_or_default(),
            f.sig.ident
        );
        self.function(name, &f.sig, &f.block, f.span());
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.function(f.sig.ident.to_string(), &f.sig, block, f.span());
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

/// What the check found in the whole workspace.
#[derive(Default)]
pub struct Findings {
    /// `member path::fn name` → lines.
    pub long_fns: BTreeMap<String, usize>,
    /// Each circle as `member: a, b, c` (sorted modules of one strongly connected part).
    pub circles: BTreeSet<String>,
}

/// Scan one crate's `src/` into `out`; names are relative to the workspace.
pub fn scan_crate(member: &str, src: &Path, out: &mut Findings) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("readable source");
        let ast = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", file.display()));
        let mut v = FileVisitor {
            module: module.clone(),
            refs: BTreeSet::new(),
            long_fns: Vec::new(),
            impl_of: None,
        };
        v.visit_file(&ast);
        let rel = file
            .strip_prefix(workspace())
            .unwrap_or(&file)
            .display()
            .to_string();
        for (name, lines) in v.long_fns {
            out.long_fns.insert(format!("{rel}::{name}"), lines);
        }
        if !module.first().is_some_and(|m| m.starts_with("bin ")) {
            modules.entry(module).or_default().extend(v.refs);
        }
    }
    let graph = edges(&modules);
    for scc in strongly_connected(&graph) {
        let names: Vec<String> = scc.iter().map(display).collect();
        out.circles
            .insert(format!("{member}: {}", names.join(", ")));
    }
}

fn display(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".to_string()
    } else {
        m.join("::")
    }
}

/// Module → modules it depends on: each reference resolved to the longest module that is
/// a prefix of it, leaving out itself and its descendants.
fn edges(modules: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mut g: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (m, refs) in modules {
        let entry = g.entry(m.clone()).or_default();
        for r in refs {
            let target = (0..=r.len())
                .rev()
                .map(|n| r[..n].to_vec())
                .find(|p| modules.contains_key(p));
            if let Some(t) = target {
                if !t.starts_with(m) {
                    entry.insert(t);
                }
            }
        }
    }
    g
}

/// Tarjan's strongly connected parts with more than one module.
fn strongly_connected(g: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<BTreeSet<ModPath>> {
    struct T<'a> {
        g: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on: BTreeSet<&'a ModPath>,
        next: usize,
        out: Vec<BTreeSet<ModPath>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a ModPath) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let Some((w, _)) = self.g.get_key_value(w) else {
                    continue;
                };
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut part = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    part.insert(w.clone());
                    if w == v {
                        break;
                    }
                }
                if part.len() > 1 {
                    self.out.push(part);
                }
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

/// Scan every member of the workspace but `tests` (end-to-end tests and their helpers:
/// all of it is test code).
pub fn scan() -> Findings {
    let mut f = Findings::default();
    for (member, src) in crate_sources(&workspace()) {
        if member == "tests" {
            continue;
        }
        scan_crate(&member, &src, &mut f);
    }
    f
}

/// A circle is allowed when a baseline circle of the same crate holds all its modules.
pub fn circle_allowed(found: &str, allowed: &BTreeSet<String>) -> bool {
    let (member, mods) = found.split_once(": ").expect("member: modules");
    let mods: BTreeSet<&str> = mods.split(", ").collect();
    allowed.iter().any(|a| {
        a.split_once(": ").is_some_and(|(m, list)| {
            let list: BTreeSet<&str> = list.split(", ").collect();
            m == member && mods.is_subset(&list)
        })
    })
}
