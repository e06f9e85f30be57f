//! Tokenizers: a Hugging Face `tokenizer.json`, or a byte-level BPE rebuilt
//! from GGUF metadata (`tokenizer.ggml.*`) with the `tokenizers` crate.

use crate::error::{LlamaError, Result};
use crate::gguf::{Gguf, GgufValue};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;
use tokenizers::SplitDelimiterBehavior;

/// The regex of Qwen2's (and Qwen2.5's, Qwen3's) `tokenizer.json`
/// pre-tokenizer, the pattern llama.cpp's `src/llama-vocab.cpp` keeps as the
/// original of its `LLAMA_VOCAB_PRE_TYPE_QWEN2` expressions: single digits,
/// letters runs with one leading non-letter, punctuation runs, newlines.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer a GGUF's `tokenizer.ggml.pre` names, as the model's
/// `tokenizer.json` spells it: `smollm` (and a file that names none, as the
/// first SmolLM2 GGUFs) splits digits one by one, then GPT-2's byte-level
/// regex; `qwen2` splits by [`QWEN2_PATTERN`], then maps bytes. Any other is
/// refused: its splits differ, and so would every token id. (`qwen2`
/// also composes characters, NFC, as its `tokenizer.json` does.)
fn pre_tokenizer(pre: Option<&str>) -> std::result::Result<PreTokenizerWrapper, String> {
    match pre {
        None | Some("smollm") => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        Some("qwen2") => {
            let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| format!("the qwen2 pre-tokenizer's regex: {e}"))?;
            Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
        }
        Some(other) => Err(format!(
            "tokenizer.ggml.pre = {other:?}: that pre-tokenizer is not supported (supported: smollm, qwen2); use the model's tokenizer.json"
        )),
    }
}

/// A tokenizer and the special tokens melora needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token, when the model uses one.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Padding token (defaults to `eos`).
    pub pad: Option<u32>,
    /// Whether `encode` prepends `bos` itself (GGUF's `add_bos_token`);
    /// a `tokenizer.json` does this through its post-processor instead.
    add_bos: bool,
}

fn tok_err(e: impl std::fmt::Display) -> LlamaError {
    LlamaError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| LlamaError::format(path, e.to_string()))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = find(&["</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>"]);
        let bos = find(&["<s>", "<|begin_of_text|>"]);
        Ok(Self {
            inner,
            bos,
            eos,
            pad: eos,
            add_bos: false,
        })
    }

    /// Rebuilds the tokenizer stored in a GGUF file (`tokenizer.ggml.model =
    /// "gpt2"`: byte-level BPE from `tokens` and `merges`, split first as
    /// `tokenizer.ggml.pre` names: [`pre_tokenizer`]).
    pub fn from_gguf(gguf: &Gguf, path: &Path) -> Result<Self> {
        let err = |m: String| LlamaError::format(path, m);
        let model = gguf
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model = {model:?}: only byte-level BPE (\"gpt2\") can be rebuilt; use the model's tokenizer.json"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            gguf.get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| err(format!("{key} missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| err(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("bad merge {m:?}")))
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = gguf.get("tokenizer.ggml.pre").and_then(GgufValue::as_str);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre).map_err(err)?));
        // Qwen2's tokenizer composes characters first (NFC).
        if pre == Some("qwen2") {
            inner.with_normalizer(Some(NFC)).map_err(tok_err)?;
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) are special: matched whole, never split.
        if let Some(types) = gguf.get("tokenizer.ggml.token_type").and_then(GgufValue::as_array) {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| t.as_u64() == Some(3))
                .map(|(_, tok)| AddedToken::from(tok.clone(), true))
                .collect();
            inner.add_special_tokens(special).map_err(tok_err)?;
        }
        let id = |key: &str| gguf.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
        let add_bos = matches!(gguf.get("tokenizer.ggml.add_bos_token"), Some(GgufValue::Bool(true)));
        let eos = id("tokenizer.ggml.eos_token_id");
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            pad: id("tokenizer.ggml.padding_token_id").or(eos),
            add_bos,
        })
    }

    /// Token ids of `text` (with the model's BOS when it uses one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(tok_err)?;
        let mut ids = encoding.get_ids().to_vec();
        if self.add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Token ids of `text` with no special tokens added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The single token that `text` encodes to; an error naming the text and
    /// its tokens if it is not exactly one token.
    pub fn single_token(&self, text: &str) -> Result<u32> {
        let ids = self.encode_plain(text)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => Err(LlamaError::Tokenizer(format!(
                "{text:?} is not a single token: it encodes to {ids:?}"
            ))),
        }
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, true)
            .map_err(|e| LlamaError::format(path, e.to_string()))
    }

    /// The vocabulary size (with added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
