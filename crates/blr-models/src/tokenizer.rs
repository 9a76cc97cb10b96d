//! Byte-level BPE (the GPT-2 scheme, used by GPT-2, SmolLM, Llama-3 and most GGUF files whose
//! `tokenizer.ggml.model` is `"gpt2"`), built from GGUF metadata.
//!
//! Encoding, in order:
//! 1. Special tokens (GGUF token types CONTROL and USER_DEFINED, e.g. `<|im_start|>`) are cut out
//!    of the raw text first, longest first, when `parse_special` is set: they never go through BPE.
//! 2. The pre-tokenizer named by `tokenizer.ggml.pre` splits the rest into words. All of the
//!    supported ones use a GPT-2-style regex with a `\s+(?!\S)` alternative; the `regex` crate has
//!    no look-ahead, so that alternative is written `(\s+)` and the match is shortened by one
//!    character when it is followed by a non-space, which is exactly what backtracking into the
//!    look-ahead does: the last space is left to prefix the next word.
//! 3. Each word's UTF-8 bytes are mapped to printable characters (GPT-2's `bytes_to_unicode`:
//!    bytes that are printable Latin-1 stand for themselves, the 68 others for U+0100..), each
//!    character is looked up as a token, and adjacent pairs are merged lowest merge rank first,
//!    all occurrences of the best pair left to right, until no listed pair remains.
//!
//! Decoding maps every token's characters back to bytes, so a token sequence decodes to exactly
//! the bytes it was encoded from (except bytes the vocabulary has no character for, which
//! encoding drops like HF `tokenizers` and llama.cpp do) (tokens may split a UTF-8 character; [`StreamDecoder`] holds the
//! partial bytes back when streaming).

use crate::gguf::GgufFile;
use crate::{Error, Result};
use regex::Regex;
use std::collections::HashMap;

/// GGUF `tokenizer.ggml.token_type` values.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's regex, with the look-ahead alternative `\s+(?!\S)|\s+` folded into a capture group
/// (see the module docs).
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|(\s+)";
/// Llama-3's regex (`llama-bpe`), folded the same way.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|(\s+)";

/// How text is split into words before BPE; the GGUF `tokenizer.ggml.pre` value picks one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex (`gpt2`, `mpt`, `olmo`, `jais`, and files with no `pre` key).
    Gpt2,
    /// Every digit its own word, then GPT-2's regex (`smollm`, `starcoder`, `refact`,
    /// `command-r`, `codeshell`): HF's `Sequence[Digits(individual_digits), ByteLevel]`.
    DigitsThenGpt2,
    /// Llama-3's regex (`llama-bpe`, `llama3`): numbers in groups of up to three digits.
    Llama3,
}

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` name.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => PreTokenizer::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
                PreTokenizer::DigitsThenGpt2
            }
            "llama-bpe" | "llama3" => PreTokenizer::Llama3,
            other => {
                return Err(Error::Tokenizer(format!(
                    "pre-tokenizer '{other}' is not supported (supported: gpt2, smollm, starcoder, \
                     refact, command-r, codeshell, llama-bpe); the model's text would be split \
                     differently from how it was trained"
                )))
            }
        })
    }

    fn pattern(self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 | PreTokenizer::DigitsThenGpt2 => GPT2_PATTERN,
            PreTokenizer::Llama3 => LLAMA3_PATTERN,
        }
    }
}

/// GPT-2's byte-to-character table: bytes `!..~`, `¡..¬`, `®..ÿ` stand for themselves, the
/// others (controls, space, DEL, NBSP, soft hyphen) get U+0100 onwards in byte order, so every
/// byte has a visible, non-space character and a BPE vocabulary can be stored as text.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let cp = if printable {
            u32::from(b)
        } else {
            let c = next;
            next += 1;
            c
        };
        table[b as usize] = char::from_u32(cp).unwrap_or('\0');
    }
    table
}

/// A byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    /// The raw bytes each token stands for (special tokens: their text).
    token_bytes: Vec<Vec<u8>>,
    is_special: Vec<bool>,
    vocab: HashMap<String, u32>,
    /// (left, right) token ids -> (merge rank, merged token id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token id of each byte's character.
    byte_token: [Option<u32>; 256],
    /// Special tokens matched in raw text, longest first.
    specials: Vec<(String, u32)>,
    pre: PreTokenizer,
    regex: Regex,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether the model expects BOS in front of every sequence (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

impl Tokenizer {
    /// Builds a tokenizer from a vocabulary (byte-level strings), merges (`"left right"`
    /// strings, highest priority first) and token types (GGUF numbering; empty means all normal).
    pub fn new(
        tokens: Vec<String>,
        merges: &[&str],
        token_types: &[i64],
        pre: PreTokenizer,
    ) -> Result<Self> {
        if tokens.is_empty() {
            return Err(Error::Tokenizer("the vocabulary is empty".into()));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(Error::Tokenizer(format!(
                "{} tokens do not fit u32 ids",
                tokens.len()
            )));
        }
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "{} token types for {} tokens: the two arrays must have the same length",
                token_types.len(),
                tokens.len()
            )));
        }
        let table = bytes_to_unicode();
        let mut inverse: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, &c) in table.iter().enumerate() {
            inverse.insert(c, b as u8);
        }

        let mut vocab = HashMap::with_capacity(tokens.len());
        let mut is_special = vec![false; tokens.len()];
        let mut specials = Vec::new();
        let mut token_bytes = Vec::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            let ty = token_types.get(id).copied().unwrap_or(1);
            let special = ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED;
            is_special[id] = special;
            if special && !tok.is_empty() {
                specials.push((tok.clone(), id as u32));
            }
            // Special tokens are plain text; byte-level tokens map back through the table
            // (a character outside it, which a well-formed vocab never has, stays as UTF-8).
            let bytes = if special {
                tok.as_bytes().to_vec()
            } else {
                let mut out = Vec::with_capacity(tok.len());
                for ch in tok.chars() {
                    match inverse.get(&ch) {
                        Some(&b) => out.push(b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend(ch.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                out
            };
            token_bytes.push(bytes);
            // First occurrence wins for duplicated strings, as in HF.
            vocab.entry(tok.clone()).or_insert(id as u32);
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let mut byte_token = [None; 256];
        for (b, c) in table.iter().enumerate() {
            byte_token[b] = vocab.get(&c.to_string()).copied();
        }

        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, line) in merges.iter().enumerate() {
            let (left, right) = line.split_once(' ').ok_or_else(|| {
                Error::Tokenizer(format!(
                    "merge {rank} ('{line}') is not two tokens separated by a space"
                ))
            })?;
            let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) else {
                return Err(Error::Tokenizer(format!(
                    "merge {rank} ('{line}') names a token that is not in the vocabulary"
                )));
            };
            let merged = format!("{left}{right}");
            let &m = vocab.get(&merged).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "merge {rank} ('{line}') produces '{merged}', which is not in the vocabulary"
                ))
            })?;
            // Keep the first (highest-priority) rank for a pair listed twice.
            merge_map.entry((l, r)).or_insert((rank as u32, m));
        }

        let regex = Regex::new(pre.pattern())
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex failed to compile: {e}")))?;
        Ok(Tokenizer {
            tokens,
            token_bytes,
            is_special,
            vocab,
            merges: merge_map,
            byte_token,
            specials,
            pre,
            regex,
            bos: None,
            eos: None,
            add_bos: false,
        })
    }

    /// Reads `tokenizer.ggml.*` from a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer.ggml.model is '{model}'; only byte-level BPE ('gpt2') is supported",
                f.path().display()
            )));
        }
        let pre = match f.get("tokenizer.ggml.pre") {
            None => PreTokenizer::Gpt2,
            Some(_) => PreTokenizer::from_gguf_name(f.get_str("tokenizer.ggml.pre")?)?,
        };
        let tokens: Vec<String> = f
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let merges = f.get_str_array("tokenizer.ggml.merges")?;
        let types = match f.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => f.get_i64_array("tokenizer.ggml.token_type")?,
        };
        let mut t = Tokenizer::new(tokens, &merges, &types, pre)?;
        let id = |key: &str| -> Result<Option<u32>> {
            match f.get(key) {
                None => Ok(None),
                Some(_) => {
                    let v = f.get_u64(key)?;
                    if v as usize >= t.tokens.len() {
                        return Err(Error::Tokenizer(format!(
                            "{key} = {v} is past the end of the {}-token vocabulary",
                            t.tokens.len()
                        )));
                    }
                    Ok(Some(v as u32))
                }
            }
        };
        t.bos = id("tokenizer.ggml.bos_token_id")?;
        t.eos = id("tokenizer.ggml.eos_token_id")?;
        t.add_bos = f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(t)
    }

    /// GPT-2's own files (`vocab.json` / `encoder.json`: token -> id; `merges.txt` /
    /// `vocab.bpe`: one merge per line after a `#version` header), as shipped with HF GPT-2
    /// checkpoints. Tokens of the form `<|...|>` are special; `<|endoftext|>` is BOS and EOS.
    pub fn from_vocab_merges(
        vocab_json: &str,
        merges_txt: &str,
        pre: PreTokenizer,
    ) -> Result<Self> {
        let map: std::collections::BTreeMap<String, u64> = serde_json::from_str(vocab_json)
            .map_err(|e| {
                Error::Tokenizer(format!("vocab.json is not a token -> id object: {e}"))
            })?;
        let n = map.len();
        let mut tokens: Vec<Option<String>> = vec![None; n];
        for (tok, id) in map {
            let slot = usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get_mut(i))
                .ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "vocab.json gives '{tok}' id {id}, outside 0..{n}: ids must be dense"
                    ))
                })?;
            if slot.is_some() {
                return Err(Error::Tokenizer(format!("vocab.json gives id {id} twice")));
            }
            *slot = Some(tok);
        }
        let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap_or_default).collect();
        let types: Vec<i64> = tokens
            .iter()
            .map(|t| {
                if t.starts_with("<|") && t.ends_with("|>") && t.len() > 4 {
                    TYPE_CONTROL
                } else {
                    1
                }
            })
            .collect();
        let merges: Vec<&str> = merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        let mut t = Tokenizer::new(tokens, &merges, &types, pre)?;
        if let Some(id) = t.token_id("<|endoftext|>") {
            t.bos = Some(id);
            t.eos = Some(id);
        }
        Ok(t)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// The stored (byte-level) string of a token.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.vocab.get(s).copied()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// The bytes a token stands for (empty for an id past the vocabulary).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Encodes text; with `parse_special`, special-token strings in the text become their ids.
    /// BOS is prepended when the model asks for it (`add_bos`).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut rest = text;
        while !rest.is_empty() {
            let found = if parse_special {
                self.find_special(rest)
            } else {
                None
            };
            let (plain, special) = match found {
                Some((at, len, id)) => (&rest[..at], Some((len, id))),
                None => (rest, None),
            };
            self.encode_plain(plain, &mut cache, &mut out)?;
            match special {
                Some((len, id)) => {
                    out.push(id);
                    rest = &rest[plain.len() + len..];
                }
                None => rest = "",
            }
        }
        Ok(out)
    }

    /// The earliest special token in `text` (longest at that position): (byte offset, length, id).
    fn find_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (s, id) in &self.specials {
            if let Some(at) = text.find(s.as_str()) {
                let better = match best {
                    None => true,
                    Some((b_at, b_len, _)) => at < b_at || (at == b_at && s.len() > b_len),
                };
                if better {
                    best = Some((at, s.len(), *id));
                }
            }
        }
        best
    }

    fn encode_plain<'t>(
        &self,
        text: &'t str,
        cache: &mut HashMap<&'t str, Vec<u32>>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        match self.pre {
            PreTokenizer::DigitsThenGpt2 => {
                // Every numeric character is a word of its own; the regex runs on what is
                // between them, never across them.
                let mut start = 0;
                for (i, ch) in text.char_indices() {
                    if ch.is_numeric() {
                        self.encode_words(&text[start..i], cache, out)?;
                        let end = i + ch.len_utf8();
                        self.encode_words(&text[i..end], cache, out)?;
                        start = end;
                    }
                }
                self.encode_words(&text[start..], cache, out)
            }
            PreTokenizer::Gpt2 | PreTokenizer::Llama3 => self.encode_words(text, cache, out),
        }
    }

    /// Splits `text` with the pre-tokenizer regex and BPE-encodes every word.
    fn encode_words<'t>(
        &self,
        text: &'t str,
        cache: &mut HashMap<&'t str, Vec<u32>>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let mut pos = 0;
        while pos < text.len() {
            let Some(caps) = self.regex.captures_at(text, pos) else {
                // The patterns match every character, so nothing is left over; be safe anyway.
                self.encode_word(&text[pos..], cache, out)?;
                break;
            };
            let (Some(m), ws) = (caps.get(0), caps.get(1)) else {
                break;
            };
            if m.start() > pos {
                self.encode_word(&text[pos..m.start()], cache, out)?;
            }
            let mut end = m.end();
            if ws.is_some() {
                // `\s+(?!\S)`: a run of 2+ spaces followed by a non-space gives up its last
                // character to the next word.
                let run = &text[m.start()..m.end()];
                let followed_by_non_space = text[m.end()..]
                    .chars()
                    .next()
                    .is_some_and(|c| !c.is_whitespace());
                if followed_by_non_space {
                    if let Some((last, _)) = run.char_indices().next_back() {
                        if last > 0 {
                            end = m.start() + last;
                        }
                    }
                }
            }
            self.encode_word(&text[m.start()..end], cache, out)?;
            pos = end;
        }
        Ok(())
    }

    /// BPE over one pre-tokenized word.
    fn encode_word<'t>(
        &self,
        word: &'t str,
        cache: &mut HashMap<&'t str, Vec<u32>>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if word.is_empty() {
            return Ok(());
        }
        if let Some(ids) = cache.get(word) {
            out.extend(ids);
            return Ok(());
        }
        // A byte whose character is not in the vocabulary is dropped, as HF `tokenizers` (BPE
        // without unk token) and llama.cpp do: SmolLM2's vocabulary lacks 21 byte characters
        // (controls such as 0x04 and 0x1d, and 0xc0, 0xc1, 0xf1..0xff, which valid UTF-8 rarely
        // or never contains), so for text holding them decode(encode(text)) != text.
        let mut parts: Vec<u32> = word
            .as_bytes()
            .iter()
            .filter_map(|&b| self.byte_token[b as usize])
            .collect();
        loop {
            let mut best: Option<(u32, u32)> = None;
            for w in parts.windows(2) {
                if let Some(&(rank, merged)) = self.merges.get(&(w[0], w[1])) {
                    if best.is_none_or(|(r, _)| rank < r) {
                        best = Some((rank, merged));
                    }
                }
            }
            let Some((rank, merged)) = best else { break };
            let mut next = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len()
                    && self
                        .merges
                        .get(&(parts[i], parts[i + 1]))
                        .is_some_and(|&(r, _)| r == rank)
                {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(parts[i]);
                    i += 1;
                }
            }
            parts = next;
        }
        out.extend(&parts);
        cache.insert(word, parts);
        Ok(())
    }

    /// Decodes ids to text (invalid UTF-8 from a partial sequence becomes U+FFFD). Special
    /// tokens are written as their text unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            bytes.extend(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Turns a stream of token ids into text pieces that are always whole UTF-8 characters: bytes
/// of a character split across tokens are held until the character is complete.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text that token `id` completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend(tok.token_bytes(id));
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_string();
                self.pending.clear();
                s
            }
            Err(e) if e.error_len().is_none() => {
                // An incomplete character at the end: emit what is complete, keep the rest.
                let valid = e.valid_up_to();
                let s = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                s
            }
            Err(_) => {
                // Invalid bytes (not just incomplete): emit lossily rather than stall.
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                s
            }
        }
    }

    /// Whatever is still held (lossily decoded).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-complete vocabulary (all 256 byte characters) plus the given merges, with the
    /// merged tokens appended in merge order, and two special tokens.
    fn tiny(merges: &[&str], pre: PreTokenizer) -> Tokenizer {
        let table = bytes_to_unicode();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        tokens.extend(table.iter().map(|c| c.to_string()));
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut types = vec![1i64; tokens.len()];
        types[0] = 3;
        types[1] = 3;
        Tokenizer::new(tokens, merges, &types, pre).unwrap()
    }

    fn strs(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| t.token_str(i).unwrap().to_string())
            .collect()
    }

    #[test]
    fn byte_table_is_a_bijection_with_known_points() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ'); // U+0120: space is the 33rd non-printable byte
        assert_eq!(t[b'\n' as usize], 'Ċ'); // U+010A
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xAD], 'Ń'); // soft hyphen, the last remapped byte: U+0143
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn merges_apply_by_rank_not_by_position() {
        // "abc": rank 0 is "b c", so the result is a + bc even though "a b" is leftmost.
        let t = tiny(&["b c", "a b", "a bc"], PreTokenizer::Gpt2);
        let ids = t.encode("abc", false).unwrap();
        assert_eq!(strs(&t, &ids), vec!["abc"]);
        let t = tiny(&["b c", "a b"], PreTokenizer::Gpt2);
        assert_eq!(strs(&t, &t.encode("abc", false).unwrap()), vec!["a", "bc"]);
        let t = tiny(&["a b", "b c"], PreTokenizer::Gpt2);
        assert_eq!(strs(&t, &t.encode("abc", false).unwrap()), vec!["ab", "c"]);
    }

    #[test]
    fn repeated_pairs_merge_left_to_right() {
        let t = tiny(&["a a"], PreTokenizer::Gpt2);
        assert_eq!(strs(&t, &t.encode("aaa", false).unwrap()), vec!["aa", "a"]);
        let t = tiny(&["a a", "aa aa"], PreTokenizer::Gpt2);
        assert_eq!(
            strs(&t, &t.encode("aaaaa", false).unwrap()),
            vec!["aaaa", "a"]
        );
    }

    #[test]
    fn gpt2_split_hand_derived() {
        // No merges: each word's bytes come out one token per byte, so the word boundaries are
        // visible by decoding each word separately.
        let t = tiny(
            &["Ġ w", "Ġw o", "o r", "Ġwo r", "Ġwor l", "Ġworl d"],
            PreTokenizer::Gpt2,
        );
        let ids = t.encode("Hi  world", false).unwrap();
        // "Hi", " " (the run of two spaces gives its last one to the word), " world".
        assert_eq!(strs(&t, &ids), vec!["H", "i", "Ġ", "Ġworld"]);
        // " \n\n" before a letter splits as " \n" + "\n" (visible through the merges: a
        // split " " + "\n\n" would give "Ġ", "ĊĊ"); trailing spaces stay one run.
        let t = tiny(&["Ġ Ċ", "Ċ Ċ"], PreTokenizer::Gpt2);
        let ids = t.encode("a \n\nb  ", false).unwrap();
        assert_eq!(strs(&t, &ids), vec!["a", "ĠĊ", "Ċ", "b", "Ġ", "Ġ"]);
        assert_eq!(t.decode(&ids, false), "a \n\nb  ");
    }

    #[test]
    fn contractions_and_digit_modes() {
        let t = tiny(&["' s", "1 2", "12 3"], PreTokenizer::Gpt2);
        assert_eq!(
            strs(&t, &t.encode("it's 123", false).unwrap()),
            vec!["i", "t", "'s", "Ġ", "123"]
        );
        // With the digit splitter, "123" can never merge, and " 1" is no longer one word.
        let t = tiny(&["' s", "1 2", "12 3", "Ġ 1"], PreTokenizer::DigitsThenGpt2);
        assert_eq!(
            strs(&t, &t.encode("it's 123", false).unwrap()),
            vec!["i", "t", "'s", "Ġ", "1", "2", "3"]
        );
        // Llama-3: digits in groups of three, letters take one leading non-letter.
        let t = tiny(&["1 2", "12 3", "4 5"], PreTokenizer::Llama3);
        assert_eq!(
            strs(&t, &t.encode("12345", false).unwrap()),
            vec!["123", "45"]
        );
    }

    #[test]
    fn specials_are_cut_out_only_when_asked() {
        let t = tiny(&[], PreTokenizer::Gpt2);
        let ids = t.encode("x<|im_start|>y", true).unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1], 1);
        assert!(t.is_special(1));
        let ids = t.encode("x<|im_start|>y", false).unwrap();
        // No merges: one token per byte, and no special id.
        assert_eq!(ids.len(), "x<|im_start|>y".len());
        assert!(!ids.contains(&1));
        assert_eq!(t.decode(&ids, false), "x<|im_start|>y");
    }

    #[test]
    fn random_text_round_trips() {
        let t = tiny(
            &["Ġ t", "h e", "Ġt he", "i n"],
            PreTokenizer::DigitsThenGpt2,
        );
        let alphabet: Vec<char> = "ab c\n\t  1é—日😀'sxyz.,!".chars().collect();
        let mut rng = blr_core::rng::Rng::new(7);
        for _ in 0..200 {
            let len = rng.below(40);
            let s: String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let ids = t.encode(&s, false).unwrap();
            assert_eq!(t.decode(&ids, false), s);
            let mut sd = StreamDecoder::new();
            let mut streamed: String = ids.iter().map(|&i| sd.push(&t, i)).collect();
            streamed.push_str(&sd.finish());
            assert_eq!(streamed, s);
        }
    }

    #[test]
    fn bytes_missing_from_the_vocabulary_are_dropped_like_hf() {
        // A vocabulary without the character of byte 0x1d (as SmolLM2's): "a\x1db" encodes as
        // "a", "b" (the HF tokenizers library gives the same for SmolLM2).
        let table = bytes_to_unicode();
        let tokens: Vec<String> = table
            .iter()
            .enumerate()
            .filter(|(b, _)| *b != 0x1d)
            .map(|(_, c)| c.to_string())
            .collect();
        let t = Tokenizer::new(tokens, &[], &[], PreTokenizer::Gpt2).unwrap();
        let ids = t.encode("a\x1db", false).unwrap();
        assert_eq!(strs(&t, &ids), vec!["a", "b"]);
        assert_eq!(t.decode(&ids, false), "ab");
    }

    #[test]
    fn gpt2_vocab_and_merges_files() {
        let table = bytes_to_unicode();
        let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        vocab.extend([
            "Ġw".to_string(),
            "Ġwo".to_string(),
            "<|endoftext|>".to_string(),
        ]);
        let json = format!(
            "{{{}}}",
            vocab
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{}: {i}", serde_json::to_string(t).unwrap()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let t =
            Tokenizer::from_vocab_merges(&json, "#version: 0.2\nĠ w\nĠw o\n", PreTokenizer::Gpt2)
                .unwrap();
        assert_eq!((t.bos, t.eos), (Some(258), Some(258)));
        assert!(t.is_special(258));
        assert_eq!(
            strs(&t, &t.encode("a wo<|endoftext|>", true).unwrap()),
            vec!["a", "Ġwo", "<|endoftext|>"]
        );
        assert!(Tokenizer::from_vocab_merges("{\"a\": 3}", "", PreTokenizer::Gpt2).is_err());
        assert!(Tokenizer::from_vocab_merges("[1]", "", PreTokenizer::Gpt2).is_err());
    }

    #[test]
    fn bad_merges_are_reported() {
        let table = bytes_to_unicode();
        let tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        let e = Tokenizer::new(tokens.clone(), &["a b"], &[], PreTokenizer::Gpt2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'ab'") && e.contains("merge 0"), "{e}");
        let e = Tokenizer::new(tokens, &["ab"], &[], PreTokenizer::Gpt2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not two tokens"), "{e}");
        assert!(PreTokenizer::from_gguf_name("qwen2").is_err());
    }
}
