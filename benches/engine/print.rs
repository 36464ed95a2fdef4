//! The one printer: each record, as it is finished, goes to stdout as a markdown table (the
//! default) or as one JSON object per line (`--format json`), with the command, commit, date and
//! machine that produced it. The measuring modules print nothing.

use std::fmt::Write as _;
use std::io::Write as _;

use serde::Serialize;

use crate::cli::Format;
use crate::record::{Context, Machine, Measurement};
use crate::stats::Spread;
use crate::{
    bandwidth, chat_reuse, engines, forward_cost, harness, load, multitoken, paired, priority, prompt_lookup, speculative, streaming,
    work_per_token,
};

pub struct Printer {
    format: Format,
    context: Context,
}

/// A JSON record: the table's name and record, and where it was made.
#[derive(Serialize)]
struct Printed<'a> {
    table: &'static str,
    record: &'a Measurement,
    command: &'a str,
    commit: &'a str,
    /// When the record was finished, UTC.
    date: &'a str,
    machine: &'a Machine,
}

impl Printer {
    pub fn new(format: Format, context: Context) -> Printer {
        Printer { format, context }
    }

    pub fn emit(&self, measurement: Measurement) {
        let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        let text = match self.format {
            Format::Json => {
                let c = &self.context;
                let printed = Printed {
                    table: measurement.name(),
                    record: &measurement,
                    command: &c.command,
                    commit: &c.commit,
                    date: &date,
                    machine: &c.machine,
                };
                serde_json::to_string(&printed).unwrap() + "\n"
            }
            Format::Markdown => markdown(&measurement, &self.context, &date),
        };
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes()).expect("stdout");
        stdout.flush().expect("stdout");
    }
}

fn markdown(measurement: &Measurement, context: &Context, date: &str) -> String {
    let mut md = Md(String::new());
    match measurement {
        Measurement::Engines(r) => engines(&mut md, r),
        Measurement::Speculative(r) => speculative(&mut md, r),
        Measurement::PromptLookup(r) => prompt_lookup(&mut md, r),
        Measurement::ForwardCost(r) => forward_cost(&mut md, r),
        Measurement::WorkPerToken(r) => work_per_token(&mut md, r),
        Measurement::Multitoken(r) => multitoken(&mut md, r),
        Measurement::Load(r) => load(&mut md, r),
        Measurement::Streaming(r) => streaming(&mut md, r),
        Measurement::Bandwidth(r) => bandwidth(&mut md, r),
        Measurement::Priority(r) => priority(&mut md, r),
        Measurement::ChatReuse(r) => chat_reuse(&mut md, r),
    }
    let m = &context.machine;
    md.line(&format!(
        "_`{}` at {}, {date}; {}, {} cores ({}; edgellm's int4 kernel {}, EDGELLM_BENCH_INT4 {})._",
        context.command,
        context.commit,
        m.cpu,
        m.cores,
        if m.isa.is_empty() { "none of the instruction sets looked for".to_string() } else { m.isa.join(" ") },
        if m.int4_supported { "runs here" } else { "does not run here" },
        m.int4_choice
    ));
    md.0
}

/// Markdown being written.
struct Md(String);

impl Md {
    fn heading(&mut self, title: &str) {
        let _ = write!(self.0, "### {title}\n\n");
    }

    fn line(&mut self, text: &str) {
        let _ = write!(self.0, "{text}\n\n");
    }

    fn table(&mut self, header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
        let _ = writeln!(self.0, "| {} |", header.join(" | "));
        let _ = writeln!(self.0, "|{}", "---|".repeat(header.len()));
        for row in rows {
            let _ = writeln!(self.0, "| {} |", row.join(" | "));
        }
        self.0.push('\n');
    }

    /// A note naming the int4 kernels that the rows' edgellm runs reported.
    fn kernels<'a>(&mut self, kernels: impl IntoIterator<Item = &'a Option<String>>) {
        let mut seen: Vec<&str> = Vec::new();
        for k in kernels.into_iter().flatten() {
            if !seen.contains(&k.as_str()) {
                seen.push(k);
            }
        }
        if !seen.is_empty() {
            self.line(&format!("int4 matrix products (edgellm): {}", seen.join("; ")));
        }
    }
}

/// `x` with `digits` decimals.
fn n(x: f64, digits: usize) -> String {
    let x = x + 0.0; // no "-0"
    format!("{x:.digits$}")
}

/// A row's cells: `texts`, then each number with its decimals.
fn cells(texts: &[&str], numbers: &[(f64, usize)]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).chain(numbers.iter().map(|&(x, digits)| n(x, digits))).collect()
}

/// "q1-q3" with `digits` decimals.
fn iqr(s: &Spread, digits: usize) -> String {
    format!("{:.digits$}-{:.digits$}", s.q1, s.q3)
}

/// "median (q1-q3)".
fn spread(s: &Spread, digits: usize) -> String {
    format!("{:.digits$} ({})", s.median, iqr(s, digits))
}

fn engines(md: &mut Md, r: &engines::Record) {
    md.heading("edgellm against onnxruntime-genai");
    md.line(&format!(
        "model {} | {} prompts | {} new tokens, greedy | intra-op threads {} in both (0 = ONNX Runtime's default) | each engine in its own process, {} rounds, the median run",
        r.model,
        r.prompts,
        r.new_tokens,
        r.threads,
        harness::REPEATS
    ));
    let mut rows = Vec::new();
    for p in r.providers.iter().filter(|p| p.skipped.is_none()) {
        for row in &p.rows {
            let numbers = [(row.load_s, 3), (row.rss_load_mib, 1), (row.ttft_ms, 2), (row.decode_tps, 1), (row.e2e_tps, 1)];
            let mut c = cells(&[&p.provider, &row.engine], &numbers);
            c.extend([n(row.rss_peak_mib, 1), row.x_weights.map_or("-".into(), |x| n(x, 3))]);
            rows.push(c);
        }
        if let Some(q) = &p.ratio {
            let ratios = [q.load_s, q.rss_load_mib, q.ttft_ms, q.decode_tps, q.e2e_tps].map(|v| format!("**{}**", n(v, 2)));
            let mut row = vec![p.provider.clone(), "**ratio edgellm / genai**".into()];
            row.extend(ratios);
            row.extend(["".into(), "".into()]);
            rows.push(row);
        }
    }
    let header = ["provider", "engine", "load s", "load RSS MiB", "TTFT ms", "decode t/s", "e2e t/s", "peak RSS MiB", "x weights"];
    md.table(&header, rows);
    for p in &r.providers {
        match (&p.skipped, p.identical) {
            (Some(why), _) => md.line(&format!("{}: skipped: {why}", p.provider)),
            (None, Some(same)) => md.line(&format!("{}: greedy outputs identical to onnxruntime-genai: {same}", p.provider)),
            (None, None) => {}
        }
    }
    md.line(&format!(
        "ratio: edgellm / genai, want decode >= 1, TTFT <= 1; x weights: load RSS over the weight files ({:.1} MiB)",
        r.weight_mib
    ));
    md.kernels(r.providers.iter().flat_map(|p| p.rows.iter().map(|row| &row.int4_kernel)));
    let paired: Vec<&paired::Record> = r.providers.iter().filter_map(|p| p.paired.as_ref()).collect();
    if !paired.is_empty() {
        paired_table(md, &paired);
    }
}

fn paired_table(md: &mut Md, records: &[&paired::Record]) {
    md.line("**Paired**: both engines loaded, each prompt run by one and right after by the other, the order alternating");
    let rows = records.iter().map(|p| {
        vec![
            p.provider.clone(),
            p.pairs.to_string(),
            spread(&p.decode_ratio, 3),
            format!("{:.0}%", 100.0 * p.edgellm_faster),
            n(p.all_tokens_ratio, 3),
            spread(&p.ttft_ratio, 2),
            format!("{} of {}", p.identical, p.pairs),
        ]
    });
    let header = [
        "provider",
        "pairs",
        "decode edgellm / genai, median (quartiles)",
        "edgellm faster in",
        "all tokens",
        "TTFT median (quartiles)",
        "outputs identical",
    ];
    md.table(&header, rows);
    md.line("Where edgellm's int4 kernel runs, it sums in another order than onnxruntime-genai's: the tests check that outputs that differ part at a near tie.");
}

fn speculative(md: &mut Md, r: &speculative::Record) {
    md.heading(&format!("speculative decoding, {} with {}, cpu, greedy", r.target, r.draft));
    let rows = r.rows.iter().map(|row| {
        let (tps, accept, per) = (row.decode_tps, row.acceptance, row.tokens_per_target_forward);
        let mut c = cells(&[&row.engine], &[(tps, 1), (accept, 3), (per, 2), (row.x_our_plain, 2), (row.x_genai_spec, 2)]);
        c.push(row.same_as_plain.clone());
        c
    });
    md.table(&["engine", "decode t/s", "accept", "tok/target fwd", "x our plain", "x genai spec", "same as plain"], rows);
    md.line("Where the time of our speculative runs goes (share of total generation time):");
    let rows = r.rows.iter().filter_map(|row| {
        let t = row.time.as_ref()?;
        Some(vec![
            row.engine.clone(),
            format!("{}%", n(t.draft_pct, 0)),
            format!("{}%", n(t.verify_pct, 0)),
            format!("{}%", n(t.rest_pct, 0)),
            format!("{} of {}", t.near_tie_recomputes, t.target_forwards),
            t.near_ties_inside.to_string(),
            n(t.tie_margin, 3),
        ])
    });
    let header = [
        "engine",
        "draft forwards",
        "target verify",
        "prefill, sampling, bookkeeping",
        "near-tie re-decisions of target forwards",
        "inside a round (rows after kept)",
        "margin at the end",
    ];
    md.table(&header, rows);
    md.kernels(r.rows.iter().map(|row| &row.int4_kernel));
}

fn prompt_lookup(md: &mut Md, r: &prompt_lookup::Record) {
    md.heading(&format!(
        "prompt lookup (ngram 3, max draft 8) vs plain, {}, cpu, greedy, {} paired rounds per prompt (order alternating)",
        r.model, r.rounds
    ));
    let rows = r.rows.iter().map(|row| {
        let mut c = cells(&[&row.prompts], &[(row.acceptance, 3), (row.drafted as f64, 0), (row.tokens_per_target_forward, 2)]);
        c.extend([n(row.x_plain.median, 3), iqr(&row.x_plain, 3), n(row.lowest_prompt, 3)]);
        c
    });
    md.table(&["prompts", "accept", "drafted", "tok/target fwd", "x plain", "x plain quartiles", "lowest prompt"], rows);
    md.line(&format!(
        "Greedy outputs identical to plain on {} of {} prompts (the tests check that the others part at a near tie); drafted = draft tokens per run.",
        r.identical, r.prompts
    ));
    md.kernels([&r.int4_kernel]);
}

fn forward_cost(md: &mut Md, r: &forward_cost::Record) {
    md.heading(&format!(
        "forward cost by positions (cpu, after a 64-token past; median of 40 rounds); speculative ceiling at acceptance {}",
        r.acceptance
    ));
    let rows = r.rows.iter().map(|row| {
        let mut c = vec![row.model.clone(), n(row.ms[0], 3)];
        c.extend(row.ms[1..].iter().map(|ms| n(ms / row.ms[0], 2)));
        c.extend([n(row.ceiling_k4, 2), n(row.ceiling_k8, 2)]);
        c
    });
    md.table(&["model", "1 pos ms", "x2 pos", "x3 pos", "x5 pos", "x9 pos", "k=4 ceil", "k=8 ceil"], rows);
    md.line(&format!(
        "kjv-draft one-token forward: {:.3} ms; ceiling = tokens per verify x one-token ms / (verify ms + k x draft ms)",
        r.draft_one_ms
    ));
    if let Some(f) = &r.floor {
        md.line(&format!(
            "This core: a 512-bit VNNI dot product every {:.3} ns (12 independent sums), a VNNI and an FMA every {:.3} ns (so they {} pipes). One more position's floor at 10 such slots per 512 weights on {} cores, against the measured (9-position minus 5-position forward) / 4:",
            f.vnni_ns,
            f.vnni_fma_ns,
            if f.share_pipes { "share" } else { "do not share" },
            f.cores
        ));
        let rows = f
            .rows
            .iter()
            .map(|row| vec![row.model.clone(), format!("{:.0} M", row.int4_weights / 1e6), n(row.floor_ms, 2), n(row.slope_ms, 2)]);
        md.table(&["model", "int4 weights", "one more position >= ms", "measured ms"], rows);
    }
}

fn work_per_token(md: &mut Md, r: &work_per_token::Record) {
    md.heading(&format!(
        "work per decoded token (callgrind instructions, 1 thread, first prompt, {} vs {} new tokens, median of {})",
        r.lengths[0], r.lengths[1], r.repeats
    ));
    let rows = r.rows.iter().flat_map(|row| {
        [
            vec![row.provider.clone(), "onnxruntime-genai".into(), n(row.genai, 0), "1.00".into()],
            vec![row.provider.clone(), "edgellm".into(), n(row.edgellm, 0), n(row.edgellm / row.genai, 3)],
        ]
    });
    md.table(&["provider", "engine", "instr/token", "x genai"], rows);
}

fn multitoken(md: &mut Md, r: &multitoken::Record) {
    md.heading(&format!("multi-token steps, {} (base = its own base, one token per step), cpu, greedy", r.hamburger));
    let rows = r.rows.iter().map(|row| {
        let (per, kv) = (row.tokens_per_base_forward, row.kv_per_token);
        let numbers = [(row.decode_tps, 1), (per, 2), (kv, 2), (row.x_base, 2), (row.x_target, 2), (row.base_nll, 3)];
        let mut c = cells(&[&row.decoding], &numbers);
        c.extend([row.same_text.to_string(), format!("{}%", n(row.micro_pct, 0))]);
        c
    });
    md.table(&["decoding", "decode t/s", "tok/base fwd", "KV/token", "x base", "x target", "base nll", "same text", "micro%"], rows);
    md.line(&format!("base nll: the model's own loss (nats/token) on the text it generated; {}'s row is under {}", r.target, r.target));
    md.kernels(r.rows.iter().map(|row| &row.int4_kernel));
}

fn load(md: &mut Md, r: &load::Record) {
    md.heading(&format!(
        "loading | {} | {} rounds, order rotating, a new process per load | weight files {:.1} MiB",
        r.model, r.rounds, r.weight_mib
    ));
    let rows = r.rows.iter().map(|row| {
        let mut c = cells(&[&row.engine], &[(row.load_s, 3), (row.load_rss_mib, 1), (row.ready_s.median, 3)]);
        c.push(iqr(&row.ready_s, 3));
        c.extend(cells(&[], &[(row.x_genai_ready, 3), (row.peak_rss_mib, 1), (row.x_weights, 3), (row.x_genai_peak, 3)]));
        c
    });
    let header = ["engine", "load s", "load RSS MiB", "ready s", "ready IQR", "x genai ready", "peak RSS MiB", "x weights", "x genai"];
    md.table(&header, rows);
    md.line("ready: the load and the first token of the first prompt; peak RSS: by then");
    md.kernels(r.rows.iter().map(|row| &row.int4_kernel));
}

fn streaming(md: &mut Md, r: &streaming::Record) {
    md.heading(&format!(
        "streamed Generate vs Complete over D-Bus | {} | {} tokens, greedy | {} pairs per variant, order alternating | the daemon's total_time_ms",
        r.model, r.new_tokens, r.calls
    ));
    let rows = r.rows.iter().map(|row| {
        let interval = row.interval_ms.map_or(format!("{} (default)", row.default_interval_ms), |ms| ms.to_string());
        let mut c = cells(&[&row.threads.to_string(), row.spinning.name(), &interval], &[(row.stream_ms, 1), (row.complete_ms, 1)]);
        c.extend([n(row.ratio, 3), iqr(&row.pair_ratio, 3), n(row.client_ms, 1), n(row.signals, 0)]);
        c
    });
    let header =
        ["threads", "spinning", "interval ms", "stream ms", "complete ms", "ratio (median)", "pair ratio IQR", "client ms", "signals"];
    md.table(&header, rows);
    md.kernels(r.rows.iter().map(|row| &row.int4_kernel));
}

fn bandwidth(md: &mut Md, r: &bandwidth::Record) {
    md.heading(&format!("physical limit | {}", r.model));
    md.line(&format!(
        "read bandwidth before each pair ({} threads over 1 GiB, best of 3): median {:.1} GB/s, {:.1}-{:.1} | weights read per token {:.1} MB (model.onnx.data {:.1} MB); MLAS's packed int8-compute layout reads {:.1} MB",
        r.cores, r.bandwidth_gbs.median, r.bandwidth_min_gbs, r.bandwidth_max_gbs, r.per_token_mb, r.file_mb, r.mlas_mb
    ));
    let rows = r.rows.iter().map(|row| {
        let mut c = cells(&[&row.engine], &[(row.decode_tps, 1), (row.weight_gbs, 2)]);
        c.extend([spread(&row.fraction_of_bound, 3), spread(&row.of_what_it_reads, 3)]);
        c
    });
    md.table(&["engine", "decode t/s", "weight GB/s", "fraction of bound", "of what it reads"], rows);
    md.line(&format!("{} paired rounds of {} prompts; fractions: median of pairs (IQR)", r.rounds, r.prompts));
    paired_table(md, &[&r.paired]);
    md.kernels([&r.paired.int4_kernel]);
}

fn priority(md: &mut Md, r: &priority::Record) {
    md.heading(&format!(
        "interactive streamed Generate (32 tokens, greedy), timed by its client | {} | {} rounds, idle and loaded alternating",
        r.model, r.rounds
    ));
    let rows = r.rows.iter().map(|row| {
        vec![row.label.clone(), n(row.ttft_ms.median, 1), iqr(&row.ttft_ms, 1), n(row.total_ms.median, 1), iqr(&row.total_ms, 1)]
    });
    md.table(&["", "TTFT ms", "TTFT IQR", "total ms", "total IQR"], rows);
    md.line(&format!(
        "ratio loaded / idle: TTFT {:.2}x, total {:.2}x (goal <= 2x each) | background throughput while loaded: about {:.0} tokens/s (their tokens over the loaded windows)",
        r.ttft_ratio, r.total_ratio, r.background_tps
    ));
    md.kernels([&r.int4_kernel]);
}

fn chat_reuse(md: &mut Md, r: &chat_reuse::Record) {
    md.heading(&format!(
        "last turn of a 4-turn chat (Chat, streamed, greedy), client's time to the first Token | {} | {} pairs, order alternating",
        r.model, r.rounds
    ));
    md.line(&format!("prompt {} tokens, {} of them reused from the connection's kept KV", r.prompt_tokens, r.cached_prompt_tokens));
    let rows = [("KV kept (same connection)", &r.kept_ms), ("no reuse (fresh connection)", &r.fresh_ms)]
        .map(|(label, s)| vec![label.to_string(), n(s.median, 1), iqr(s, 1)]);
    md.table(&["", "TTFT ms", "IQR"], rows);
    md.line(&format!("ratio kept / fresh: {:.3}x median of pairs (IQR {}; goal <= 0.25x)", r.ratio.median, iqr(&r.ratio, 3)));
    md.kernels([&r.int4_kernel]);
}
