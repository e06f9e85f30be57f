//! How a user's question ([`super::files::Question`]) becomes prompts: a
//! template for answer scoring (the prompt each choice continues, the
//! choice after a prefix) and one for label scoring (the lettered choices
//! listed, the label's token scored). Placeholders: `{question}`,
//! `{context}` (empty when a question has none; a template without it
//! gets a question's context on a line before), and `{choices}` (label
//! scoring only: `A) text` lines).

use super::files::Question;
use super::Cloze;
use serde::{Deserialize, Serialize};

/// The prompt templates of a task from files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Template {
    /// Answer scoring's prompt: each choice's likelihood as its continuation.
    pub prompt: String,
    /// Label scoring's prompt, ending where the label's token is scored.
    pub label_prompt: String,
    /// What comes before a choice in its continuation (answer scoring).
    pub choice_prefix: String,
}

impl Default for Template {
    /// The benchmarks' own formats: OLMES's cloze prompt and melora's
    /// lettered prompt (`Item::render`).
    fn default() -> Self {
        Self {
            prompt: "Question: {question}\nAnswer:".into(),
            label_prompt: "Return the label of the correct answer for the question below.\n\nQuestion: {question}\nChoices:\n{choices}Answer:".into(),
            choice_prefix: " ".into(),
        }
    }
}

const FIELDS: [&str; 3] = ["question", "context", "choices"];

impl Template {
    /// Checks the placeholders: `{question}` in both prompts, `{choices}`
    /// in the label prompt only, nothing else between braces.
    pub fn check(&self) -> Result<(), String> {
        for (key, text, choices) in [
            ("prompt", &self.prompt, false),
            ("label_prompt", &self.label_prompt, true),
        ] {
            let mut rest = text.as_str();
            while let Some(open) = rest.find('{') {
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| format!("template {key}: a '{{' without its '}}'"))?;
                let name = &rest[open + 1..open + close];
                if !FIELDS.contains(&name) || (name == "choices" && !choices) {
                    let known = if choices {
                        "{question}, {context}, {choices}"
                    } else {
                        "{question}, {context}"
                    };
                    return Err(format!("template {key}: {{{name}}} is not a field (it knows {known})"));
                }
                rest = &rest[open + close + 1..];
            }
            if !text.contains("{question}") {
                return Err(format!("template {key} has no {{question}}"));
            }
        }
        if !self.label_prompt.contains("{choices}") {
            return Err("template label_prompt has no {choices}: label scoring shows the lettered choices".into());
        }
        Ok(())
    }

    fn fill(template: &str, q: &Question, choices: &str) -> String {
        let context = q.context.as_deref().unwrap_or("");
        let filled = template
            .replace("{question}", &q.question)
            .replace("{context}", context)
            .replace("{choices}", choices);
        match &q.context {
            Some(c) if !template.contains("{context}") => format!("{c}\n{filled}"),
            None if template.contains("{context}") => filled.trim_start_matches('\n').to_string(),
            _ => filled,
        }
    }

    /// Answer scoring's requests: the prompt and each choice's continuation.
    pub fn cloze(&self, q: &Question) -> Vec<Cloze> {
        let context = Self::fill(&self.prompt, q, "");
        q.choices
            .iter()
            .map(|c| Cloze {
                context: context.clone(),
                continuation: format!("{}{c}", self.choice_prefix),
            })
            .collect()
    }

    /// Label scoring's prompt, the choices as `A) text` lines.
    pub fn label_text(&self, q: &Question) -> String {
        let choices: String = q
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}) {c}\n", (b'A' + i as u8) as char))
            .collect();
        Self::fill(&self.label_prompt, q, &choices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Item;

    fn question(context: Option<&str>) -> Question {
        Question {
            id: None,
            question: "Which gas?".into(),
            context: context.map(String::from),
            choices: vec!["oxygen".into(), "carbon dioxide".into()],
            answer: 1,
        }
    }

    /// The default templates give the benchmarks' own prompts: OLMES's
    /// cloze requests and `Item::render`'s lettered prompt.
    #[test]
    fn the_defaults_are_the_benchmark_formats() {
        let t = Template::default();
        t.check().unwrap();
        let q = question(None);
        let item = Item::Choice {
            question: q.question.clone(),
            choices: q.choices.clone(),
            label: 1,
        };
        assert_eq!(t.label_text(&q), item.render());
        assert_eq!(t.cloze(&q), item.cloze(crate::data::Task::ArcE));
    }

    #[test]
    fn context_goes_where_the_template_says_or_first() {
        let q = question(Some("Plants breathe."));
        let t = Template::default();
        assert_eq!(t.cloze(&q)[1].context, "Plants breathe.\nQuestion: Which gas?\nAnswer:");
        let own = Template {
            prompt: "{context}\nQ: {question}\nA:".into(),
            choice_prefix: " -> ".into(),
            ..Template::default()
        };
        own.check().unwrap();
        let cloze = own.cloze(&q);
        assert_eq!(cloze[0].context, "Plants breathe.\nQ: Which gas?\nA:");
        assert_eq!(cloze[1].continuation, " -> carbon dioxide");
        // Without a context the empty first line goes.
        assert_eq!(own.cloze(&question(None))[0].context, "Q: Which gas?\nA:");
    }

    #[test]
    fn bad_templates_are_refused() {
        let with = |prompt: &str, label: &str| Template {
            prompt: prompt.into(),
            label_prompt: label.into(),
            choice_prefix: " ".into(),
        };
        let ok_label = "Q: {question}\n{choices}A:";
        for (t, expected) in [
            (with("Q: {questoin}\nA:", ok_label), "{questoin} is not a field"),
            (with("Q:\nA:", ok_label), "template prompt has no {question}"),
            (with("Q: {question} {choices}", ok_label), "{choices} is not a field"),
            (with("Q: {question", ok_label), "without its '}'"),
            (
                with("Q: {question}", "Q: {question}\nA:"),
                "label_prompt has no {choices}",
            ),
        ] {
            let err = t.check().unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }
}
