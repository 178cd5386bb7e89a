//! Which encoding counts for which model.

use super::Encoding;

/// Model-name prefixes and their encodings, after OpenAI's own table. The longest matching
/// prefix wins, so `gpt-4o-2024-08-06` is o200k_base (via `gpt-4o`) while `gpt-4-0613` is
/// cl100k_base (via `gpt-4`). The policy's `[models."NAME"]` entries come first.
const BUILT_IN: &[(&str, Encoding)] = &[
    ("gpt-5", Encoding::O200kBase),
    ("gpt-4.5", Encoding::O200kBase),
    ("gpt-4.1", Encoding::O200kBase),
    ("gpt-4o", Encoding::O200kBase),
    ("chatgpt-4o", Encoding::O200kBase),
    ("o1", Encoding::O200kBase),
    ("o3", Encoding::O200kBase),
    ("o4", Encoding::O200kBase),
    ("ft:gpt-4o", Encoding::O200kBase),
    ("gpt-4", Encoding::Cl100kBase),
    ("gpt-3.5-turbo", Encoding::Cl100kBase),
    ("gpt-35-turbo", Encoding::Cl100kBase),
    ("ft:gpt-4", Encoding::Cl100kBase),
    ("ft:gpt-3.5-turbo", Encoding::Cl100kBase),
    ("text-embedding-3-", Encoding::Cl100kBase),
    ("text-embedding-ada-002", Encoding::Cl100kBase),
];

/// The built-in encoding of a model, by longest prefix, if the table knows it.
///
/// A prefix matches the whole name, or a name that continues with `-`, `.` or `:` or a digit
/// after it (`o1` matches `o1-mini` and `o1`, not `o1x`), so an unrelated model that merely
/// starts with the same letters is not counted with the wrong tokenizer.
pub fn built_in_encoding(model: &str) -> Option<Encoding> {
    BUILT_IN
        .iter()
        .filter(|(prefix, _)| {
            model.strip_prefix(prefix).is_some_and(|rest| {
                rest.is_empty()
                    || prefix.ends_with('-')
                    || rest.starts_with(['-', '.', ':'])
                    || rest.starts_with(|c: char| c.is_ascii_digit())
            })
        })
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|&(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_models_map_as_openai_documents() {
        let o200k = [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-2024-08-06",
            "gpt-4.1",
            "gpt-4.1-nano",
            "gpt-5",
            "gpt-5-mini",
            "o1",
            "o1-preview",
            "o3-mini",
            "o4-mini",
            "chatgpt-4o-latest",
        ];
        for m in o200k {
            assert_eq!(built_in_encoding(m), Some(Encoding::O200kBase), "{m}");
        }
        let cl100k = [
            "gpt-4",
            "gpt-4-0613",
            "gpt-4-turbo",
            "gpt-4-32k",
            "gpt-3.5-turbo",
            "gpt-3.5-turbo-0125",
            "text-embedding-3-small",
            "text-embedding-3-large",
        ];
        for m in cl100k {
            assert_eq!(built_in_encoding(m), Some(Encoding::Cl100kBase), "{m}");
        }
        for m in ["claude-3-opus", "llama-3", "o1x", "gpt-", "", "gpt-4x"] {
            assert_eq!(built_in_encoding(m), None, "{m}");
        }
    }
}
