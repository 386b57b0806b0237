//! `quarry`: run, chat with, evaluate and inspect GGUF models.
//!
//! Errors are printed as one line on stderr with exit code 1; usage errors exit with 2.

mod bench;
mod commands;
mod limits;
mod lql;
mod models;
mod serve;
mod vindex;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "quarry",
    version,
    about = "Run large language models from GGUF files and Hugging Face safetensors directories"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Store the weights of a Hugging Face (safetensors) model as q8_0 or q4_k when loading
    /// it, so the integer kernels serve them.
    #[arg(long, global = true, value_name = "TYPE")]
    quantize: Option<String>,
    /// Where `run`, `chat`, `perplexity`, `bench` and `serve` run the forward pass: `cpu`, `gpu` (the
    /// first adapter, software ones included) or `auto` (a hardware GPU if there is one, else
    /// the CPU). `quarry info --devices` lists the adapters.
    #[arg(long, global = true, value_enum, default_value = "cpu")]
    device: commands::Device,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming the generated text.
    Run(RunArgs),
    /// Multi-turn chat using the model's chat template (reads turns from stdin).
    Chat(ChatArgs),
    /// Perplexity of a text file, with llama.cpp's method.
    Perplexity(PerplexityArgs),
    /// Show the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Show a model's architecture, hyper-parameters and tensor types.
    Info(InfoArgs),
    /// Prompt-processing and generation speed (llama-bench semantics).
    Bench(BenchArgs),
    /// Decompile a model into a vindex directory (see docs/vindex.md).
    Extract(ExtractArgs),
    /// Re-hash every file of a vindex against its manifest.
    Verify(VerifyArgs),
    /// Run LQL statements (see docs/lql.md).
    Lql(LqlArgs),
    /// Interactive LQL shell with history (\help for its commands).
    Repl(ReplArgs),
    /// OpenAI-compatible HTTP server with continuous batching (see docs/serve.md).
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// GGUF file, model alias (gemma3, smollm2), or a NAME.vindex directory (adds the
    /// knowledge routes).
    pub model: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Context of each sequence in tokens (default: the model's, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Memory bound of the KV cache in MiB (default: room for --parallel full contexts).
    #[arg(long)]
    pub kv_mem: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Seconds a request may take in all before it fails.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Seconds a request may wait for a free slot and KV memory before it gets a 503.
    #[arg(long, default_value_t = 60)]
    pub queue_timeout: u64,
    /// Connections served at once (WebSockets included); more wait in the listen backlog
    /// [default: 4096, fewer if the open-file limit is lower].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers (idle keep-alive connections close
    /// after this too).
    #[arg(long, default_value_t = quarry_server::DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    pub header_timeout: u64,
    /// Knowledge statements (vindex routes) run at once; more wait up to --queue-timeout.
    #[arg(long, default_value_t = 2)]
    pub knowledge_parallel: usize,
    /// A llama.cpp LoRA adapter GGUF (adapting ffn_down only, as `COMPILE … INTO ADAPTER`
    /// writes) applied on top of the model's weights.
    #[arg(long, value_name = "ADAPTER.gguf")]
    pub lora: Option<std::path::PathBuf>,
    /// Let clients edit the served model: POST /v1/insert, /v1/update, /v1/delete,
    /// /v1/patches and the editing statements of /v1/lql (403 without this flag).
    #[arg(long)]
    pub allow_edits: bool,
    /// The directory patch files and COMPILE outputs of edit clients are read from and
    /// written to (their paths are relative to it); without it, statements that name files
    /// are refused.
    #[arg(long, value_name = "DIR", requires = "allow_edits")]
    pub edits_dir: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct LqlArgs {
    /// Statements separated by `;` (or use --file).
    #[arg(required_unless_present = "file")]
    pub statements: Option<String>,
    /// Read the statements from a script file.
    #[arg(short, long, conflicts_with = "statements")]
    pub file: Option<std::path::PathBuf>,
    /// Open this vindex first (like USE).
    #[arg(long)]
    pub vindex: Option<std::path::PathBuf>,
    /// Threads (default: one per physical core).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// One JSON result set per line instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReplArgs {
    /// Open this vindex first (like USE).
    #[arg(long)]
    pub vindex: Option<std::path::PathBuf>,
    /// Threads (default: one per physical core).
    #[arg(short, long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// GGUF file, or a model alias.
    pub model: String,
    /// Output directory (conventionally NAME.vindex); must not exist.
    #[arg(short, long)]
    pub output: std::path::PathBuf,
    /// browse (enough to query without running the model), inference (adds the model file for
    /// forward passes), all (adds every feature's write vector, for editing).
    #[arg(long, default_value = "browse", value_parser = ["browse", "inference", "all"])]
    pub level: String,
    /// Element type of the stored vectors.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    pub dtype: String,
    /// Tokens kept per feature at each end of its vocabulary projection.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Threads (default: one per physical core).
    #[arg(short, long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A vindex directory.
    pub vindex: std::path::PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// Options shared by everything that generates text.
#[derive(Args, Clone, Debug)]
pub struct GenArgs {
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 disables).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1 disables).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than M times the most likely one (0 disables).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for recently seen tokens (1 disables).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Subtracted from a token's logit once per earlier occurrence.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit if it occurred at all.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Recent tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (same seed, same text).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// A llama.cpp LoRA adapter GGUF (adapting ffn_down only, as `COMPILE … INTO ADAPTER`
    /// writes) applied on top of the model's weights.
    #[arg(long, value_name = "ADAPTER.gguf")]
    pub lora: Option<std::path::PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    /// GGUF file, or a model alias (gemma3, smollm2) fetched on first use.
    pub model: String,
    /// The text to continue.
    pub prompt: String,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Do not add the model's BOS token.
    #[arg(long)]
    pub no_bos: bool,
    /// Print one JSON object (token ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    /// GGUF file, or a model alias (gemma3, smollm2) fetched on first use.
    pub model: String,
    /// A system message placed before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenArgs,
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// GGUF file, or a model alias.
    pub model: String,
    /// The text file to score.
    pub file: std::path::PathBuf,
    /// Window size in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// A llama.cpp LoRA adapter GGUF (adapting ffn_down only, as `COMPILE … INTO ADAPTER`
    /// writes) applied on top of the model's weights.
    #[arg(long, value_name = "ADAPTER.gguf")]
    pub lora: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// GGUF file, or a model alias.
    pub model: String,
    /// The text to tokenize.
    pub text: String,
    /// Do not add the model's BOS token.
    #[arg(long)]
    pub no_bos: bool,
    /// Treat control-token texts such as <|im_start|> as plain text.
    #[arg(long)]
    pub no_parse_special: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// GGUF file, or a model alias.
    #[arg(required_unless_present = "devices")]
    pub model: Option<String>,
    /// List the GPU adapters `--device` can use instead.
    #[arg(long)]
    pub devices: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// GGUF file, or a model alias.
    pub model: String,
    /// Prompt tokens processed in one pass (0 skips the test).
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Tokens generated one at a time (0 skips the test).
    #[arg(long, default_value_t = 128)]
    pub tg: usize,
    /// Sequences decoded together in the generation test, comma-separated (`1,8`): each
    /// count above 1 adds a `tg N ×B` row, B sequences stepping as one batch (a server's
    /// decode), reported as their aggregate tok/s.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Measured repetitions of each test (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Skip the memory read-bandwidth measurement.
    #[arg(long)]
    pub no_bandwidth: bool,
    /// A llama.cpp LoRA adapter GGUF (adapting ffn_down only, as `COMPILE … INTO ADAPTER`
    /// writes) applied on top of the model's weights.
    #[arg(long, value_name = "ADAPTER.gguf")]
    pub lora: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runs_models = matches!(
        cli.command,
        Command::Run(_)
            | Command::Chat(_)
            | Command::Perplexity(_)
            | Command::Bench(_)
            | Command::Serve(_)
    );
    if cli.device == commands::Device::Gpu && !runs_models {
        eprintln!(
            "error: --device gpu applies to run, chat, perplexity, bench and serve; the \
             vindex commands run on the CPU for now"
        );
        return ExitCode::from(2);
    }
    commands::set_device(cli.device);
    if let Err(e) = commands::set_quantize(cli.quantize.as_deref()) {
        eprintln!("error: {}", one_line(&e));
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Run(a) => commands::run(a),
        Command::Chat(a) => commands::chat(a),
        Command::Perplexity(a) => commands::perplexity(a),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::Info(a) => commands::info(a),
        Command::Bench(a) => commands::bench(a),
        Command::Extract(a) => vindex::extract(a),
        Command::Verify(a) => vindex::verify(a),
        Command::Lql(a) => lql::run(a),
        Command::Repl(a) => lql::repl(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes as one line, each cause once.
///
/// Errors in this workspace often say what their source said ("{path}: cannot read: {source}")
/// and also return that source from `source()`; printing the chain as it stands (`{:#}`) then
/// repeats a cause once per level that wraps it. A cause whose text the line already holds is
/// left out; one that adds something is appended after ": ". Line breaks inside a message
/// become spaces, so the error stays on one line.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line.lines().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug)]
    struct Wrapped {
        text: &'static str,
        source: Option<Box<Wrapped>>,
    }

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.text)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.source.as_deref().map(|s| s as _)
        }
    }

    fn chain(texts: &[&'static str]) -> anyhow::Error {
        let mut error: Option<Box<Wrapped>> = None;
        for text in texts.iter().rev() {
            error = Some(Box::new(Wrapped {
                text,
                source: error,
            }));
        }
        anyhow::Error::new(*error.unwrap())
    }

    #[test]
    fn each_cause_is_printed_once() {
        // A message that already quotes its source, wrapped again: the cause appears once.
        let e = chain(&[
            "USE: x/index.json: cannot read: No such file (os error 2)",
            "x/index.json: cannot read: No such file (os error 2)",
            "No such file (os error 2)",
        ]);
        assert_eq!(
            one_line(&e),
            "USE: x/index.json: cannot read: No such file (os error 2)"
        );
        // Causes that add something are kept, in order.
        let e = chain(&["opening the vindex", "x: format is \"\"", "bad"]);
        assert_eq!(one_line(&e), "opening the vindex: x: format is \"\": bad");
        let e = anyhow::Error::new(Wrapped {
            text: "line one\nline two",
            source: None,
        })
        .context("outer");
        assert_eq!(one_line(&e), "outer: line one line two");
    }
}
