//! The layers of the configuration as TOML trees: values given as text
//! typed like the settings they replace, paths into the tree, merging, and
//! reading the merged tree into the typed configuration.

use super::Config;

/// A value given as text (environment, `--set`), typed like the setting it
/// replaces: `JOBMETER__KAFKA__GROUP_ID=2024` is the string "2024", and
/// `JOBMETER__BATCH__MAX_EVENTS=2000` the number 2000. Text that does not
/// fit the setting's type stays text, so the error names the setting.
pub(super) fn env_value(raw: &str, current: Option<&toml::Value>) -> toml::Value {
    let text = || toml::Value::String(raw.to_owned());
    match current {
        Some(toml::Value::String(_)) => text(),
        Some(toml::Value::Integer(_)) => raw.trim().parse().map_or_else(|_| text(), toml::Value::Integer),
        Some(toml::Value::Boolean(_)) => raw.trim().parse().map_or_else(|_| text(), toml::Value::Boolean),
        Some(toml::Value::Float(_)) => raw.trim().parse().map_or_else(|_| text(), toml::Value::Float),
        Some(toml::Value::Array(_)) => format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(text),
        // Not a known setting (an error later), or a librdkafka property
        // (always text).
        _ => text(),
    }
}

/// The typed configuration of `table`. A value of the wrong type is
/// reported with its path and taken out (its default stands in), and the
/// rest is read again, so that every such value is reported at once (and
/// the other checks still run); `None` when a wrong value cannot be taken
/// out.
pub(super) fn typed(mut table: toml::Table, errors: &mut Vec<String>) -> Option<Config> {
    loop {
        match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())) {
            Ok(cfg) => return Some(cfg),
            Err(e) => {
                let path: Vec<String> = e.path().iter().map(ToString::to_string).collect();
                let message = e.inner().to_string();
                // The TOML error appends "in `path`" on a line of its own.
                let message = message.lines().next().unwrap_or_default().trim();
                errors.push(match path.as_slice() {
                    [] | [_] if path.iter().all(|s| s == "?") => message.to_owned(),
                    _ => format!("{}: {message}", e.path()),
                });
                if !remove_path(&mut table, &path) {
                    return None;
                }
            }
        }
    }
}

/// Removes the value at `path`; false when there is none.
pub(super) fn remove_path(root: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut t = root;
    for p in parents {
        match t.get_mut(p).and_then(toml::Value::as_table_mut) {
            Some(next) => t = next,
            None => return false,
        }
    }
    t.remove(last).is_some()
}

pub(super) fn get_path<'a>(root: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = root;
    for p in parents {
        t = t.get(p)?.as_table()?;
    }
    t.get(last)
}

/// librdkafka property names contain dots (`sasl.password`): below
/// `kafka.properties` the rest of a path is one key, whether it was written
/// `kafka.properties.sasl.password` or `JOBMETER__KAFKA__PROPERTIES__SASL__PASSWORD`.
pub(super) fn property_path(path: Vec<String>) -> Vec<String> {
    match path.as_slice() {
        [k, p, rest @ ..] if k == "kafka" && p == "properties" && rest.len() > 1 => {
            vec![k.clone(), p.clone(), rest.join(".")]
        }
        _ => path,
    }
}

pub(super) fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = root;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else { return };
        t = next;
    }
    t.insert(last.clone(), value);
}

pub(super) fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
