//! A small YAML emitter for JSON values (block style, quoted strings):
//! what `--output yaml` prints.

use serde_json::Value;

/// A small YAML emitter for JSON values (block style, quoted strings).
pub(crate) fn yaml(v: &Value, indent: usize) -> String {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if m.is_empty() => "{}\n".into(),
        Value::Array(a) if a.is_empty() => "[]\n".into(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Object(c) if !c.is_empty() => format!("{pad}{k}:\n{}", yaml(v, indent + 2)),
                Value::Array(c) if !c.is_empty() => format!("{pad}{k}:\n{}", yaml(v, indent + 2)),
                _ => format!("{pad}{k}: {}", yaml(v, 0)),
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|item| {
                let body = yaml(item, indent + 2);
                format!("{pad}- {}", body.trim_start())
            })
            .collect(),
        Value::String(s) => format!("{}\n", serde_json::to_string(s).unwrap_or_default()),
        other => format!("{other}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_values_become_block_yaml_with_quoted_strings() {
        let v = serde_json::json!({
            "id": "vol-1",
            "size": 5,
            "labels": {"a": "x: y"},
            "nodes": ["n1", "n2"],
            "empty": [],
        });
        assert_eq!(
            yaml(&v, 0),
            "empty: []\nid: \"vol-1\"\nlabels:\n  a: \"x: y\"\nnodes:\n  - \"n1\"\n  - \"n2\"\nsize: 5\n"
        );
    }
}
