#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure here is a test failure
//! Tests on the real SmolLM2-135M-Instruct GGUF. They are skipped, with the reason printed, when
//! the file is absent (fetch it with scripts/fetch-smollm2.sh); CI decides whether to fetch it.
//!
//! The expected token ids were produced once with the Hugging Face `tokenizers` library
//! (BPE model from this file's vocabulary and merges, pre-tokenizer
//! `Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]`, the 17
//! control tokens added as special tokens), i.e. SmolLM2's own tokenizer configuration. The
//! expected tensor values come from the `gguf` Python package's dequantiser.

use blr_models::gguf::GgufFile;
use blr_models::quant::GgmlType;
use blr_models::tokenizer::{PreTokenizer, Tokenizer};

fn open() -> Option<GgufFile> {
    match blr_models::smollm2_path() {
        Ok(p) => Some(GgufFile::open(p).expect("SmolLM2 GGUF should parse")),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

const CASES: &[(&str, &[u32])] = &[
    ("Hello, world!", &[19556, 28, 905, 17]),
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    (
        " = Valkyria Chronicles III = \n",
        &[446, 717, 1727, 105, 5484, 34471, 8140, 446, 3717],
    ),
    (
        "In 1998, the 2,000 runners ran 42.195 km.",
        &[
            788, 216, 33, 41, 41, 40, 28, 260, 216, 34, 28, 32, 32, 32, 25334, 7674, 216, 36, 34,
            30, 33, 41, 37, 6381, 30,
        ],
    ),
    (
        "  leading spaces and   inner   runs\n\n\ttabs",
        &[
            216, 2899, 5600, 284, 256, 6210, 256, 7313, 1116, 197, 100, 7366,
        ],
    ),
    (
        "naïve café — “quoted” 日本語 😀",
        &[
            3546, 46494, 37366, 1841, 619, 385, 5036, 573, 17097, 241, 115, 40993, 179, 120, 248,
            40303, 218,
        ],
    ),
    (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        &[
            1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198,
        ],
    ),
    (
        "don't won't I'm they're we've she'll he'd",
        &[
            12420, 982, 3763, 982, 339, 5248, 502, 2316, 392, 3543, 1041, 3060, 384, 6737,
        ],
    ),
    (
        " @-@ 3 @,@ 000 <unk> ",
        &[
            3394, 29, 48, 216, 35, 3394, 28, 48, 216, 32, 32, 32, 2067, 5131, 46, 216,
        ],
    ),
];

/// Unicode edge cases (NBSP, ideographic and other Unicode spaces, line/paragraph separators,
/// vertical tab and form feed, NEL, numbers in other scripts, combining marks, zero-width
/// characters, uppercase contractions, NUL), same provenance as CASES.
const EDGE_CASES: &[(&str, &[u32])] = &[
    ("a\u{a0}b  \u{a0}c", &[81, 15442, 82, 256, 15442, 83]),
    (
        "a\u{3000}b\u{3000}\u{3000}c",
        &[81, 12109, 218, 82, 12109, 218, 12109, 218, 83],
    ),
    ("x\u{2028}y\u{2029}z", &[104, 321, 118, 105, 321, 119, 106]),
    ("v\u{b}f\u{c}r\u{d}n", &[102, 199, 86, 200, 98, 201, 94]),
    ("a\u{85}b", &[81, 141, 223, 82]),
    ("\u{1680}x", &[172, 244, 218, 104]),
    (
        "tab\u{9}\u{9}x \u{9} y",
        &[15999, 197, 197, 104, 216, 197, 329],
    ),
    (
        "\u{bd} \u{2167} \u{661}\u{662} x\u{b2}",
        &[
            16738, 216, 173, 223, 117, 216, 164, 111, 164, 112, 1792, 19133,
        ],
    ),
    (
        "caf\u{e9} na\u{308}ive \u{1f600}\u{1f600}",
        &[
            83, 1939, 2756, 15486, 151, 226, 404, 40303, 218, 10813, 242, 218,
        ],
    ),
    ("A\u{200b}B\u{200d}C", &[49, 321, 229, 50, 321, 231, 51]),
    ("  \u{a}  \u{a} x", &[256, 11181, 198, 1792]),
    ("x\u{a}\u{a}\u{a}y", &[104, 1116, 198, 105]),
    ("'S 'LL 'd've", &[23, 67, 637, 16421, 637, 84, 3543]),
    ("\u{0}\u{1} ok", &[190, 191, 10907]),
];

#[test]
fn smollm2_metadata_and_types() {
    let Some(f) = open() else { return };
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_usize("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_usize("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.tensors().len(), 272);
    let q = f.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.ty, GgmlType::Q4_1);
    assert_eq!(q.shape(), vec![576, 576]);
    assert_eq!(
        f.tensor_info("token_embd.weight").unwrap().ty,
        GgmlType::Q8_0
    );
}

fn check(f: &GgufFile, name: &str, first: &[f64], last: &[f64], sum: f64, sumsq: f64) {
    let (_, d) = f.tensor_f32(name).unwrap();
    for (a, b) in d.iter().zip(first) {
        assert!((f64::from(*a) - b).abs() < 1e-6, "{name}: {a} vs {b}");
    }
    for (a, b) in d[d.len() - last.len()..].iter().zip(last) {
        assert!((f64::from(*a) - b).abs() < 1e-6, "{name}: {a} vs {b}");
    }
    let s: f64 = d.iter().map(|&x| f64::from(x)).sum();
    let s2: f64 = d.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    assert!(
        (s - sum).abs() < 1e-6 * sumsq.max(1.0),
        "{name}: sum {s} vs {sum}"
    );
    assert!(
        (s2 - sumsq).abs() < 1e-6 * sumsq,
        "{name}: sum of squares {s2} vs {sumsq}"
    );
}

#[test]
fn smollm2_dequantisation_matches_reference() {
    let Some(f) = open() else { return };
    check(
        &f,
        "token_embd.weight",
        &[
            -0.10654449462890625,
            0.032978057861328125,
            0.048198699951171875,
        ],
        &[-0.11989402770996094, -0.0417022705078125],
        -15353.04449415207,
        520415.71544763993,
    );
    check(
        &f,
        "blk.0.attn_q.weight",
        &[-0.0963134765625, 0.1573486328125, -0.0963134765625],
        &[-0.14984130859375, -0.255859375],
        59.22322082519531,
        26749.573275085306,
    );
    check(
        &f,
        "blk.29.ffn_down.weight",
        &[-0.2733154296875, 0.186279296875, 0.186279296875],
        &[-0.08984375, 0.056640625],
        49.83570861816406,
        29667.074891592143,
    );
    check(
        &f,
        "output_norm.weight",
        &[1.7578125, 1.8203125, 1.78125],
        &[1.921875, 1.984375],
        1038.33203125,
        1921.7355499267578,
    );
}

#[test]
fn smollm2_tokenizer_matches_known_encodings() {
    let Some(f) = open() else { return };
    let t = Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!((t.bos, t.eos, t.add_bos), (Some(1), Some(2), false));
    for (text, want) in CASES.iter().chain(EDGE_CASES) {
        let got = t.encode(text, true).unwrap();
        assert_eq!(&got, want, "encoding {text:?}");
        assert_eq!(t.decode(&got, false), *text);
    }
}

#[test]
fn smollm2_generates_coherent_text() {
    use blr_models::cpu::Cpu;
    use blr_models::llama::{self, Llama};
    use blr_models::lm::{generate, Sampler};
    let Some(f) = open() else { return };
    let t = Tokenizer::from_gguf(&f).unwrap();
    let (cfg, ck) = llama::from_gguf(&f).unwrap();
    let model = Llama::load(Cpu, cfg, ck).unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = t.encode(prompt, true).unwrap();
    let stats = generate(&model, &ids, 24, &mut Sampler::greedy(), &[2], |_| Ok(())).unwrap();
    let text = t.decode(&stats.generated, true);
    eprintln!("{prompt}{text}");
    assert!(text.contains("Paris"), "{text:?}");
}
