//! umT5's tokenizer as `WanPipeline` calls it: `tokenizer/tokenizer.json` read through the
//! `tokenizers` crate, each prompt cleaned as `prompt_clean` does, then encoded with the `</s>`
//! the tokenizer's post-processor appends, truncated and padded with `<pad>` to
//! `max_sequence_length` (512 in `WanPipeline.__call__`).
//!
//! `WanPipeline` truncates a longer prompt silently; [`Encoded::truncated`] says how many tokens
//! each prompt lost so that a caller can warn.
//!
//! The normalizer, pre-tokenizer and post-processor are the file's. transformers 5's
//! `T5Tokenizer` instead rebuilds them on load: it keeps only a `Precompiled` normalizer (umT5's
//! SentencePiece charsmap) and sets the pre-tokenizer to WhitespaceSplit + Metaspace(prepend
//! "always"). For umT5's own file (Precompiled, Metaspace) the two agree on cleaned prompts,
//! whose whitespace is single spaces; a file with another normalizer would be read as written
//! here but not by transformers 5.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tch::Tensor;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// The tokenizer file of a tokenizer directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// `WanPipeline.__call__`'s default `max_sequence_length`: every prompt becomes this many tokens.
pub const MAX_SEQUENCE_LENGTH: usize = 512;
/// umT5's padding token (id 0).
pub const PAD_TOKEN: &str = "<pad>";

/// Prompts encoded as `WanPipeline._get_t5_prompt_embeds` encodes them.
#[derive(Debug)]
pub struct Encoded {
    /// Token ids, `[batch, max_length]`, int64, padded on the right with the pad id.
    pub input_ids: Tensor,
    /// 1 for a token, 0 for padding, `[batch, max_length]`, int64.
    pub attention_mask: Tensor,
    /// Tokens per prompt after truncation, `</s>` included (the mask's row sums).
    pub lengths: Vec<usize>,
    /// Tokens per prompt that truncation dropped (0 where the prompt fits). `WanPipeline`
    /// drops them without a word; a caller should warn when any is not 0.
    pub truncated: Vec<usize>,
}

/// umT5's tokenizer, loaded from a `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct WanTokenizer {
    /// No truncation, no padding: counts the tokens a prompt has.
    plain: Tokenizer,
    /// Truncation and padding to [`MAX_SEQUENCE_LENGTH`], built once (umT5's vocabulary has
    /// 256k pieces: not something to copy per call).
    fixed: Tokenizer,
    pad_id: u32,
}

impl WanTokenizer {
    /// Loads `dir/tokenizer.json` (a pipeline's `tokenizer/` directory).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<WanTokenizer> {
        WanTokenizer::from_file(dir.as_ref().join(TOKENIZER_FILE))
    }

    /// Loads a `tokenizer.json`. A missing file is [`Error::Io`]; a file the `tokenizers`
    /// crate cannot read, or one without a `<pad>` token, is [`Error::Format`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<WanTokenizer> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        WanTokenizer::parse(&text, path)
    }

    /// A tokenizer from the text of a `tokenizer.json` (e.g. one built into a program with
    /// `include_str!`); errors as [`WanTokenizer::from_file`]'s, naming no file.
    pub fn from_json(text: &str) -> Result<WanTokenizer> {
        WanTokenizer::parse(text, Path::new("<tokenizer.json text>"))
    }

    fn parse(text: &str, path: &Path) -> Result<WanTokenizer> {
        let format = |reason: String| Error::Format {
            path: path.to_owned(),
            reason,
        };
        let mut plain: Tokenizer = text
            .parse()
            .map_err(|e| format(format!("not a tokenizers tokenizer.json: {e}")))?;
        let pad_id = plain
            .token_to_id(PAD_TOKEN)
            .ok_or_else(|| format(format!("no {PAD_TOKEN} token (umT5's is id 0)")))?;
        // The file's own padding and truncation settings are not what WanPipeline asks for.
        plain
            .with_truncation(None)
            .map_err(|e| format(format!("clearing truncation: {e}")))?;
        plain.with_padding(None);
        let fixed = fixed_length(&plain, pad_id, MAX_SEQUENCE_LENGTH)
            .map_err(|e| format(format!("truncation to {MAX_SEQUENCE_LENGTH} tokens: {e}")))?;
        Ok(WanTokenizer {
            plain,
            fixed,
            pad_id,
        })
    }

    /// The id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The vocabulary size, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.plain.get_vocab_size(true)
    }

    /// The tokenizers crate's tokenizer, without truncation or padding.
    pub fn inner(&self) -> &Tokenizer {
        &self.plain
    }

    /// Cleans each prompt ([`prompt_clean`]) and encodes it as `WanPipeline` does:
    /// `tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
    /// add_special_tokens=True, return_attention_mask=True)`. A prompt longer than
    /// `max_length` tokens keeps its first `max_length - 1` and `</s>`; see
    /// [`Encoded::truncated`]. `max_length` must be at least 1 ([`Error::Input`]).
    pub fn encode(&self, prompts: &[&str], max_length: usize) -> Result<Encoded> {
        if max_length == 0 {
            return Err(Error::Input {
                reason: "max_sequence_length must be at least 1".into(),
            });
        }
        let other;
        let fixed = if max_length == MAX_SEQUENCE_LENGTH {
            &self.fixed
        } else {
            other = fixed_length(&self.plain, self.pad_id, max_length)
                .map_err(|e| self.input(format!("truncation to {max_length} tokens: {e}")))?;
            &other
        };
        let mut ids = Vec::with_capacity(prompts.len() * max_length);
        let mut mask = Vec::with_capacity(prompts.len() * max_length);
        let mut lengths = Vec::with_capacity(prompts.len());
        let mut truncated = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let cleaned = prompt_clean(prompt);
            let full = self
                .plain
                .encode(cleaned.as_str(), true)
                .map_err(|e| self.input(format!("encoding {prompt:?}: {e}")))?;
            let enc = fixed
                .encode(cleaned.as_str(), true)
                .map_err(|e| self.input(format!("encoding {prompt:?}: {e}")))?;
            debug_assert_eq!(enc.get_ids().len(), max_length);
            ids.extend(enc.get_ids().iter().map(|&i| i64::from(i)));
            mask.extend(enc.get_attention_mask().iter().map(|&m| i64::from(m)));
            let n = enc.get_attention_mask().iter().filter(|&&m| m != 0).count();
            lengths.push(n);
            truncated.push(full.get_ids().len().saturating_sub(n));
        }
        let shape = [prompts.len() as i64, max_length as i64];
        Ok(Encoded {
            input_ids: Tensor::from_slice(&ids).reshape(shape),
            attention_mask: Tensor::from_slice(&mask).reshape(shape),
            lengths,
            truncated,
        })
    }

    fn input(&self, reason: String) -> Error {
        Error::Input { reason }
    }
}

/// `plain` with `WanPipeline`'s truncation and padding to `max_length` tokens.
fn fixed_length(
    plain: &Tokenizer,
    pad_id: u32,
    max_length: usize,
) -> tokenizers::Result<Tokenizer> {
    let mut fixed = plain.clone();
    fixed.with_truncation(Some(TruncationParams {
        direction: TruncationDirection::Right,
        max_length,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))?;
    fixed.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(max_length),
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token: PAD_TOKEN.to_owned(),
    }));
    Ok(fixed)
}

/// `WanPipeline`'s `prompt_clean`: `whitespace_clean(basic_clean(text))`, i.e. HTML entities
/// unescaped twice (`html.unescape(html.unescape(text))`), then every run of whitespace
/// collapsed to one space, then the ends stripped.
///
/// Not done: `ftfy.fix_text`, which `basic_clean` applies first only where the `ftfy` package
/// is installed (diffusers does not require it; mojibake repair is left to the user). HTML
/// unescaping covers numeric references (`&#39;`, `&#x27;`, with or without `;`) and the named
/// entities [`NAMED_ENTITIES`] lists (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&nbsp;`
/// and a few typographic ones), not all 2231 of HTML5 (an unknown name stays as it is);
/// numeric references to control characters are not dropped, nor those to the C1 range
/// remapped to Windows-1252, as Python does. Whitespace is Unicode's White_Space (what
/// `regex`'s `\s` matches); stripping also removes U+001C..U+001F as Python's `str.strip` does.
pub fn prompt_clean(text: &str) -> String {
    let basic = html_unescape(&html_unescape(text));
    let basic = basic.trim_matches(is_py_space);
    let mut out = String::with_capacity(basic.len());
    let mut in_space = false;
    for c in basic.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(c);
            in_space = false;
        }
    }
    out.trim_matches(is_py_space).to_owned()
}

/// Python's `str.isspace`.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The named HTML entities [`prompt_clean`] unescapes, and whether Python also takes each
/// without its `;` (the legacy ones).
pub const NAMED_ENTITIES: [(&str, char, bool); 16] = [
    ("amp", '&', true),
    ("lt", '<', true),
    ("gt", '>', true),
    ("quot", '"', true),
    ("apos", '\'', false),
    ("nbsp", '\u{a0}', true),
    ("copy", '\u{a9}', true),
    ("reg", '\u{ae}', true),
    ("deg", '\u{b0}', true),
    ("hellip", '\u{2026}', false),
    ("mdash", '\u{2014}', false),
    ("ndash", '\u{2013}', false),
    ("lsquo", '\u{2018}', false),
    ("rsquo", '\u{2019}', false),
    ("ldquo", '\u{201c}', false),
    ("rdquo", '\u{201d}', false),
];

/// One pass of Python's `html.unescape` over the references [`prompt_clean`] covers.
fn html_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match unescape_one(rest) {
            Some((c, used)) => {
                out.push(c);
                rest = &rest[used..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The character the reference at the start of `s` (which starts with `&`) stands for, and
/// the bytes it takes; `None` leaves the `&` as it is.
fn unescape_one(s: &str) -> Option<(char, usize)> {
    let body = &s[1..];
    if let Some(num) = body.strip_prefix('#') {
        let (digits, radix, prefix) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 2),
            None => (num, 10, 1),
        };
        let n = digits
            .chars()
            .take_while(|c| c.is_digit(radix))
            .map(char::len_utf8)
            .sum::<usize>();
        if n == 0 {
            return None;
        }
        let value = u32::from_str_radix(&digits[..n], radix).unwrap_or(u32::MAX);
        let semi = usize::from(digits[n..].starts_with(';'));
        // Python: 0, surrogates and values past U+10FFFF become U+FFFD.
        let c = match value {
            0 => '\u{fffd}',
            v => char::from_u32(v).unwrap_or('\u{fffd}'),
        };
        return Some((c, 1 + prefix + n + semi));
    }
    for (name, c, legacy) in NAMED_ENTITIES {
        if let Some(after) = body.strip_prefix(name) {
            if after.starts_with(';') {
                return Some((c, 1 + name.len() + 1));
            }
            if legacy {
                return Some((c, 1 + name.len()));
            }
        }
    }
    None
}

/// The tokenizer file of a pipeline directory: `dir/tokenizer/tokenizer.json`.
pub fn pipeline_tokenizer_file(pipeline_dir: impl AsRef<Path>) -> PathBuf {
    pipeline_dir.as_ref().join("tokenizer").join(TOKENIZER_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_matches_python_on_entities_and_whitespace() {
        // Expected values from Python's html.unescape and WanPipeline's prompt_clean.
        assert_eq!(prompt_clean("  a\t b\n\nc  "), "a b c");
        assert_eq!(prompt_clean("&amp;amp; &lt;x&gt;"), "& <x>");
        assert_eq!(prompt_clean("&#39;q&#x27; &#39x"), "'q' 'x");
        assert_eq!(prompt_clean("a &amp b &apos c"), "a & b &apos c");
        assert_eq!(prompt_clean("&#0;&#xD800;"), "\u{fffd}\u{fffd}");
        assert_eq!(prompt_clean("x&nbsp;y"), "x y");
        assert_eq!(prompt_clean("\u{1c}a\u{3000}b\u{1f}"), "a b");
        assert_eq!(prompt_clean("&unknown; & &#;"), "&unknown; & &#;");
    }
}
