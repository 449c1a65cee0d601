//! No two files of `src/` import each other, directly or around a circle.
//!
//! Reads the sources (no build of the crate is needed: `cargo test --test
//! imports`): every path a file names that starts at `crate`, `super`,
//! `self` or one of its child modules (in `use` declarations and inline, as
//! in `crate::actors::router::Router::new`) is an edge from that file to the
//! file of the deepest module the path reaches. A `mod` declaration is not
//! an edge; a re-export (`pub use child::Thing`) is. The library and each
//! binary are checked on their own (a binary reaches the library only
//! through its crate name, which never leads back). Test modules count:
//! a test that needs a file above its own belongs to that file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One crate's module tree: module path (`["actors", "router"]`) → file.
struct Tree {
    modules: BTreeMap<Vec<String>, PathBuf>,
}

impl Tree {
    /// Every module file under the crate root `root` (`lib.rs`, `main.rs`),
    /// following `mod name;` declarations.
    fn load(root: &Path) -> Tree {
        let mut tree = Tree {
            modules: BTreeMap::new(),
        };
        tree.add(Vec::new(), root.to_path_buf());
        tree
    }

    fn add(&mut self, module: Vec<String>, file: PathBuf) {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let code = strip(&text);
        // A file's own directory for its children: `x/mod.rs`, `lib.rs`
        // and `main.rs` hold them beside themselves, `x.rs` in `x/`.
        let dir = match file.file_name().and_then(|n| n.to_str()) {
            Some("mod.rs" | "lib.rs" | "main.rs") => file.parent().map(Path::to_path_buf),
            _ => Some(file.with_extension("")),
        }
        .unwrap_or_default();
        self.modules.insert(module.clone(), file);
        for child in declared_files(&code) {
            let plain = dir.join(format!("{child}.rs"));
            let nested = dir.join(&child).join("mod.rs");
            let path = if plain.exists() { plain } else { nested };
            if path.exists() {
                let mut sub = module.clone();
                sub.push(child);
                self.add(sub, path);
            }
        }
    }

    /// The file of the deepest module `path` (absolute, without `crate`)
    /// reaches.
    fn file_of(&self, path: &[String]) -> Option<(&Vec<String>, &PathBuf)> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.modules.get_key_value(&path[..n]))
    }

    /// Edges: file → the files it names.
    fn edges(&self) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
        let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
        for (module, file) in &self.modules {
            let code = strip(&std::fs::read_to_string(file).unwrap_or_default());
            let out = edges.entry(file.clone()).or_default();
            for (inline, path) in named_paths(&code) {
                let mut here = module.clone();
                here.extend(inline);
                let Some(absolute) = self.absolute(&here, &path) else {
                    continue;
                };
                if let Some((_, target)) = self.file_of(&absolute)
                    && target != file
                {
                    out.insert(target.clone());
                }
            }
        }
        edges
    }

    /// `path` as named in module `here`, made absolute; `None` for a path
    /// into another crate.
    fn absolute(&self, here: &[String], path: &[String]) -> Option<Vec<String>> {
        let mut at: Vec<String> = here.to_vec();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                at.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    at.pop()?;
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                // A child module of `here` (2018 paths), else another crate.
                let mut child = here.to_vec();
                child.push(first.to_owned());
                if !self.modules.contains_key(&child) {
                    return None;
                }
            }
            None => return None,
        }
        at.extend(rest.iter().cloned());
        Some(at)
    }
}

/// Source text without comments, string and char literals (they may hold
/// anything that looks like a path).
fn strip(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && matches!(next, Some('#' | '"')) && !ident_before(&b, i) {
            // Raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime ('a).
            let close = if next == Some('\\') {
                (i + 3..b.len().min(i + 12)).find(|&j| b[j] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(j) => {
                    i = j + 1;
                    out.push_str("' '");
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// `mod name;` declarations (modules in files of their own).
fn declared_files(code: &str) -> Vec<String> {
    let words = tokens(code);
    let mut found = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if w == "mod"
            && let (Some(name), Some(end)) = (words.get(i + 1), words.get(i + 2))
            && end == ";"
        {
            found.push(name.clone());
        }
    }
    found
}

/// Identifiers, `::` and single punctuation characters, in order.
fn tokens(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // `r#ident` is the identifier.
            out.push(word);
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".to_owned());
            i += 2;
        } else if c.is_whitespace() {
            i += 1;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

/// Every path the code names that may lead into the crate, with the inline
/// modules (`mod tests { … }`) it is named in: `use` trees expanded, and
/// inline paths (`a::b::c` not after `::`).
fn named_paths(code: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let t = tokens(code);
    let mut found = Vec::new();
    // Inline modules open at a brace depth.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let is_ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
    };
    while i < t.len() {
        let w = t[i].as_str();
        match w {
            "{" => {
                depth += 1;
                i += 1;
            }
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth + 1) {
                    inline.pop();
                }
                i += 1;
            }
            "mod" if t.get(i + 2).map(String::as_str) == Some("{") => {
                inline.push((t[i + 1].clone(), depth + 1));
                depth += 1;
                i += 3;
            }
            "use" => {
                let end = (i..t.len()).find(|&j| t[j] == ";").unwrap_or(t.len());
                let module: Vec<String> = inline.iter().map(|(m, _)| m.clone()).collect();
                for path in expand(&t[i + 1..end]) {
                    found.push((module.clone(), path));
                }
                i = end + 1;
            }
            _ if is_ident(w)
                && t.get(i + 1).map(String::as_str) == Some("::")
                && (i == 0 || t[i - 1] != "::") =>
            {
                let mut path = vec![w.to_owned()];
                let mut j = i + 1;
                while t.get(j).map(String::as_str) == Some("::")
                    && t.get(j + 1).is_some_and(|s| is_ident(s))
                {
                    path.push(t[j + 1].clone());
                    j += 2;
                }
                let module: Vec<String> = inline.iter().map(|(m, _)| m.clone()).collect();
                found.push((module, path));
                i = j;
            }
            _ => i += 1,
        }
    }
    found
}

/// A `use` tree's tokens (`a::b::{c, d::e as f}`) as full paths.
fn expand(t: &[String]) -> Vec<Vec<String>> {
    expand_in(t, false)
}

/// [`expand`]; `nested`: inside a group, where `self` is the group's prefix.
fn expand_in(t: &[String], nested: bool) -> Vec<Vec<String>> {
    if nested && t.len() == 1 && t[0] == "self" {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    let mut prefix = Vec::new();
    let mut i = 0;
    while i < t.len() {
        match t[i].as_str() {
            "::" => i += 1,
            "{" => {
                // Split the group at top-level commas.
                let mut level = 0;
                let mut start = i + 1;
                for j in i..t.len() {
                    match t[j].as_str() {
                        "{" => level += 1,
                        "}" => {
                            level -= 1;
                            if level == 0 {
                                for mut sub in expand_in(&t[start..j], true) {
                                    let mut full = prefix.clone();
                                    full.append(&mut sub);
                                    out.push(full);
                                }
                                return out;
                            }
                        }
                        "," if level == 1 => {
                            for mut sub in expand_in(&t[start..j], true) {
                                let mut full = prefix.clone();
                                full.append(&mut sub);
                                out.push(full);
                            }
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
                return out;
            }
            "as" | "*" => break,
            w => {
                prefix.push(w.to_owned());
                i += 1;
            }
        }
    }
    if !prefix.is_empty() {
        out.push(prefix);
    }
    out
}

/// The circles in `edges`: each strongly connected component of more than
/// one file, as its files.
fn circles(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    // Tarjan's algorithm, iteratively small enough to recurse.
    struct State<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on_stack: BTreeSet<&'a PathBuf>,
        found: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a PathBuf) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

/// Where the crate's sources are.
fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The crate roots: the library and every binary.
fn roots() -> Vec<PathBuf> {
    let mut roots = vec![src().join("lib.rs")];
    if let Ok(bins) = std::fs::read_dir(src().join("bin")) {
        for bin in bins.flatten() {
            let path = bin.path();
            let main = path.join("main.rs");
            if main.exists() {
                roots.push(main);
            } else if path.extension().is_some_and(|e| e == "rs") {
                roots.push(path);
            }
        }
    }
    roots
}

fn describe(
    circle: &[PathBuf],
    edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
    base: &Path,
) -> String {
    let name = |p: &PathBuf| p.strip_prefix(base).unwrap_or(p).display().to_string();
    let members: BTreeSet<&PathBuf> = circle.iter().collect();
    let mut lines = Vec::new();
    for file in circle {
        let to: Vec<String> = edges
            .get(file)
            .into_iter()
            .flatten()
            .filter(|t| members.contains(t))
            .map(name)
            .collect();
        lines.push(format!("  {} → {}", name(file), to.join(", ")));
    }
    lines.join("\n")
}

#[test]
fn no_file_of_src_imports_one_that_imports_it_back() {
    let base = src();
    let mut report = Vec::new();
    let mut files = 0;
    for root in roots() {
        let tree = Tree::load(&root);
        files += tree.modules.len();
        let edges = tree.edges();
        for circle in circles(&edges) {
            report.push(describe(&circle, &edges, &base));
        }
    }
    assert!(files > 40, "found only {files} module files under src/");
    assert!(
        report.is_empty(),
        "import circles (each file → the files of its circle it imports):\n{}",
        report.join("\n\n")
    );
}

/// The checker itself: a circle is found, a re-export counts, a `mod`
/// declaration does not, paths in comments and strings do not.
#[test]
fn the_checker_sees_what_it_should() {
    let code = strip(
        "// use crate::a::b;\n\
         /* crate::c::d */ let s = \"crate::e::f\"; let c = '\"';\n\
         pub use self::inner::{X, deep::{Y as Z, self}};\n\
         mod inner;\n\
         fn f() { super::sibling::g(); }\n\
         mod tests { use super::*; use crate::x::Y; }",
    );
    let paths = named_paths(&code);
    let plain: Vec<String> = paths
        .iter()
        .map(|(m, p)| format!("{}|{}", m.join("::"), p.join("::")))
        .collect();
    assert_eq!(
        plain,
        [
            "|self::inner::X",
            "|self::inner::deep::Y",
            "|self::inner::deep",
            "|super::sibling::g",
            "tests|super",
            "tests|crate::x::Y",
        ]
    );
    assert_eq!(declared_files(&code), ["inner"]);

    let a = PathBuf::from("a.rs");
    let b = PathBuf::from("b.rs");
    let c = PathBuf::from("c.rs");
    let mut edges = BTreeMap::new();
    edges.insert(a.clone(), BTreeSet::from([b.clone()]));
    edges.insert(b.clone(), BTreeSet::from([c.clone()]));
    edges.insert(c.clone(), BTreeSet::from([a.clone()]));
    assert_eq!(circles(&edges), [vec![a.clone(), b.clone(), c.clone()]]);
    edges.insert(c, BTreeSet::new());
    assert!(circles(&edges).is_empty());
}
