//! The module graph of every crate has no cycles: within each directory of
//! modules (a crate's `src`, `service/`, `service/engine/`…), no two
//! sibling modules refer to each other, directly or around a loop. A
//! reference is a `crate::…` path through the directory or, from a
//! module's own file, a `super::…` path; comments and tests do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its test module.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers that follow `prefix` in `text`.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            text[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// A cycle in `edges`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_cycles() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    let mut dirs_checked = 0;
    for krate in std::fs::read_dir(root.join("crates")).expect("crates").flatten() {
        let src = krate.path().join("src");
        let mut files = Vec::new();
        rs_files(&src, &mut files);
        // Every directory that holds modules, with its `crate::` path.
        let mut dirs: BTreeSet<PathBuf> = files.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
        dirs.retain(|d| !d.ends_with("bin"));
        for dir in dirs {
            let rel = dir.strip_prefix(&src).expect("under src");
            let through: String = rel
                .components()
                .map(|c| format!("{}::", c.as_os_str().to_string_lossy()))
                .collect();
            // Sibling modules: `x.rs` or `x/`, and which files belong to each.
            let mut members: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
            for f in &files {
                let Ok(inner) = f.strip_prefix(&dir) else { continue };
                let first = inner.components().next().expect("a component");
                let name = first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
                if ["lib", "main", "mod", "bin"].contains(&name.as_str()) {
                    continue;
                }
                members.entry(name).or_default().push(f.clone());
            }
            let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (m, fs) in &members {
                let mut to = BTreeSet::new();
                for f in fs {
                    let text = code(f);
                    to.extend(names_after(&text, &format!("crate::{through}")));
                    let own_file = f.parent() == Some(dir.as_path())
                        || f.parent() == Some(dir.join(m).as_path()) && f.ends_with("mod.rs");
                    if own_file {
                        to.extend(names_after(&text, "super::"));
                    }
                }
                to.retain(|x| x != m && members.contains_key(x));
                edges.insert(m.clone(), to);
            }
            dirs_checked += 1;
            if let Some(c) = find_cycle(&edges) {
                problems.push(format!("{}: {}", dir.display(), c.join(" -> ")));
            }
        }
    }
    assert!(dirs_checked >= 5, "only {dirs_checked} module directories found");
    assert!(problems.is_empty(), "module cycles:\n{}", problems.join("\n"));
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |pairs: &[(&str, &str)]| {
        let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            e.entry((*a).into()).or_default().insert((*b).into());
            e.entry((*b).into()).or_default();
        }
        e
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        names_after("use crate::x::y; crate::z(", "crate::"),
        ["x", "z"].map(String::from).into()
    );
}

/// The billing core reads no clock: only `time.rs` (which defines
/// `Timestamp::now` for the adapters) may name the system clock.
#[test]
fn the_core_reads_no_clock() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/jobmeter-core/src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    assert!(files.len() > 10);
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("time.rs"))
        .filter(|f| {
            let text = code(f);
            ["Timestamp::now", "SystemTime", "Instant::now"]
                .iter()
                .any(|n| text.contains(n))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "the core reads the clock in {offenders:?}");
}

/// Every relative link of the README and the `docs/` pages points at a
/// file of the repository, and every page of `docs/` is linked from the
/// README: the manual cannot lose a page or point at a moved one.
#[test]
fn the_docs_link_to_files_that_exist() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ has pages");
    pages.extend(docs.iter().cloned());
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("page");
        let base = page.parent().expect("folder");
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let target = &rest[..rest.find(')').expect("closing parenthesis")];
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let file = target.split('#').next().unwrap_or_default();
            assert!(
                base.join(file).exists(),
                "{}: link to {target}, which does not exist",
                page.display()
            );
        }
    }
    for d in &docs {
        let name = format!("docs/{}", d.file_name().and_then(|n| n.to_str()).expect("name"));
        assert!(readme.contains(&format!("]({name})")), "README does not link {name}");
    }
}
