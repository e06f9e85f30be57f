//! SmolLM2-135M from the fetched GGUF (ignored by default; `cargo test
//! -- --ignored` runs it after `melora fetch`, as `.ci/run` does): greedy
//! continuation of "The capital of France is" begins " Paris.", and a plain
//! sentence has a perplexity under 10.

use burn::backend::NdArray;
use burn::module::Module;
use melora_llama::assets::Assets;
use melora_llama::generate::{generate, perplexity, GenerateOptions};
use melora_llama::pretrained::Pretrained;
use melora_llama::{Llama, Tokenizer};

type B = NdArray<f32>;

fn smollm2() -> (Llama<B>, Tokenizer) {
    let assets = Assets::from_env();
    assert!(
        assets.smollm2_gguf().is_file(),
        "{} is absent: run `melora fetch` first",
        assets.smollm2_gguf().display()
    );
    let (model, tokenizer, report) = Pretrained::open("smollm2-135m", &assets)
        .unwrap()
        .build::<B>(&Default::default())
        .unwrap();
    assert!(report.unused.is_empty(), "unused tensors: {:?}", report.unused);
    (model, tokenizer.unwrap())
}

#[test]
#[ignore = "needs the fetched model and data: run `melora fetch`, then `cargo test --workspace -- --ignored`"]
fn smollm2_knows_the_capital_of_france_and_reads_english() {
    let (model, tokenizer) = smollm2();
    let config = Pretrained::open("smollm2-135m", &Assets::from_env()).unwrap().config;
    assert_eq!(config, melora_llama::LlamaConfig::smollm2_135m());
    assert_eq!(model.num_params(), 134_515_008, "SmolLM2-135M parameter count");
    let options = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let text = generate(
        &model,
        &tokenizer,
        "The capital of France is",
        &options,
        &Default::default(),
        |_| {},
    )
    .unwrap();
    println!("continuation: {text:?}");
    assert!(text.starts_with(" Paris."), "continuation {text:?}");
    let ids = tokenizer
        .encode("The capital of France is Paris. The capital of Germany is Berlin.")
        .unwrap();
    let ppl = perplexity(&model, &ids, &Default::default()).unwrap();
    println!("perplexity {ppl:.3}");
    assert!(ppl < 10.0, "perplexity {ppl}");
    // Answer labels are single tokens.
    for label in [" A", " B", " C", " D", " True", " False"] {
        tokenizer.single_token(label).unwrap();
    }
    assert_eq!(
        tokenizer.encode("<|im_start|>user").unwrap()[0],
        1,
        "control tokens are matched whole"
    );
    // The rebuilt tokenizer written as tokenizer.json reads back identically.
    let path = std::env::temp_dir().join(format!("melora-{}-tokenizer.json", std::process::id()));
    tokenizer.save(&path).unwrap();
    let reloaded = Tokenizer::from_file(&path).unwrap();
    let text = "Answer: 12345 apples, <|im_end|> naïve café";
    assert_eq!(reloaded.encode(text).unwrap(), tokenizer.encode(text).unwrap());
    assert_eq!(
        reloaded.decode(&tokenizer.encode(text).unwrap()).unwrap(),
        tokenizer.decode(&tokenizer.encode(text).unwrap()).unwrap()
    );
    std::fs::remove_file(&path).ok();
}
