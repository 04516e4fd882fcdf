"""geno-eval on a model trained briefly on the synthetic genome: the same numbers from the Megatron
checkpoint (1 process, TP=2, PP=2) and from its HuggingFace export; variant scores equal a direct
computation with transformers; variants the generating chain finds improbable score low; bad
input is one line and exit code 2."""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_geno.data import synthetic_genome, synthetic_transitions
from megatron_geno.distributed import free_port
from tests.functional.launcher import geno_train, quiet_env
from tests.unit.test_preprocess import manifest

SEED, LENGTH, STEPS, WINDOW = 1234, 200_000, 150, 64
BASES = "ACGT"


def geno_eval(*args, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--master-port", str(free_port())] if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "megatron_geno.evaluation.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=quiet_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"geno-eval failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("geno-eval: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model trained STEPS steps on the synthetic genome, its HF export, the genome as a
    reference FASTA, a token-store corpus of it (2 assemblies, 2 contigs each held out), and a VCF
    of SNVs labelled by the generating chain."""
    root = tmp_path_factory.mktemp("eval")
    geno_train(root / "train", f"schedule.train_iters={STEPS}", "schedule.warmup_iters=10",
               f"data.synthetic_genome_length={LENGTH}", f"data.synthetic_seed={SEED}",
               f"checkpoint.save={root / 'ckpt'}")
    subprocess.run([sys.executable, "-m", "checkpoint_tools.cli", "to-hf", "--checkpoint",
                    str(root / "ckpt"), "--out", str(root / "hf")], check=True,
                   capture_output=True, env=quiet_env(), timeout=600)
    contigs = {f"c{i}": "".join(BASES[b - 5] for b in c)
               for i, c in enumerate(synthetic_genome(LENGTH, SEED))}
    ref = root / "ref.fa"
    ref.write_text("".join(f">{name}\n{seq}\n" for name, seq in contigs.items()))
    rows = []
    for a, names in enumerate((list(contigs)[:50], list(contigs)[50:])):
        path = root / f"asm{a}.fa"
        path.write_text("".join(f">chr{i}\n{contigs[n]}\n" for i, n in enumerate(names)))
        rows.append({"assembly": f"asm{a}", "sample": f"s{a}", "species": f"species {a}",
                     "path": path.name})
    subprocess.run([sys.executable, "-m", "data_pipeline.cli", "run", "--manifest",
                    str(manifest(root, rows)), "--out", str(root / "corpus"),
                    "--holdout-contigs", "valid=^chr(0|1)$"], check=True, capture_output=True,
                   env=quiet_env(), timeout=600)
    # SNVs at every 37th position away from contig ends; truth from the chain (A C G T = 0..3)
    chain = synthetic_transitions(SEED)
    records = []
    for name, seq in list(contigs.items())[:30]:
        for pos0 in range(WINDOW, len(seq) - WINDOW, 37):
            state = 4 * BASES.index(seq[pos0 - 2]) + BASES.index(seq[pos0 - 1])
            for alt in BASES:
                if alt == seq[pos0]:
                    continue
                p = chain[state, BASES.index(alt)]
                label = 1 if p < 0.01 else 0 if p > 0.25 else None
                if label is not None:
                    records.append((name, pos0 + 1, seq[pos0], alt, label))
    vcf = root / "snvs.vcf"
    write_vcf(vcf, contigs, records)
    # the layout comparison: every 6th (see test_variant_scores_match_transformers_and_every_layout)
    parity = root / "parity.vcf"
    write_vcf(parity, contigs, records[::6])
    return {"root": root, "ckpt": root / "ckpt", "hf": root / "hf", "ref": ref,
            "corpus": root / "corpus", "vcf": vcf, "parity": parity, "contigs": contigs,
            "records": records}


def write_vcf(path: Path, contigs: dict, records: list, header_contigs: bool = True) -> None:
    lines = ["##fileformat=VCFv4.2"]
    if header_contigs:
        lines += [f"##contig=<ID={n},length={len(s)}>" for n, s in contigs.items()]
    lines += ['##INFO=<ID=CLNSIG,Number=.,Type=String,Description="truth">',
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    for i, (chrom, pos, ref, alt, label) in enumerate(records):
        sig = {1: "Pathogenic", 0: "Benign", None: "Uncertain_significance"}[label]
        lines.append(f"{chrom}\t{pos}\tv{i}\t{ref}\t{alt}\t.\t.\tCLNSIG={sig}")
    path.write_text("\n".join(lines) + "\n")


def read_tsv(path: Path) -> list[dict]:
    head, *rows = path.read_text().splitlines()
    return [dict(zip(head.split("\t"), row.split("\t"))) for row in rows]


def test_loss_is_the_same_from_every_layout_and_the_export(env):
    results = {}
    for name, args, nproc in (("megatron", ["--checkpoint", env["ckpt"]], 1),
                              ("tp2", ["--checkpoint", env["ckpt"], "--tensor-parallel", 2], 2),
                              ("pp2", ["--checkpoint", env["ckpt"], "--pipeline-parallel", 2], 2),
                              ("cp2", ["--checkpoint", env["ckpt"], "--context-parallel", 2], 2),
                              ("hf", ["--hf", env["hf"]], 1)):
        out = env["root"] / f"loss_{name}.json"
        proc = geno_eval("loss", *args, "--corpus", env["corpus"], "--window", 128,
                         "--json", out, nproc=nproc)
        assert "asm0" in proc.stdout and "bits/base" in proc.stdout
        results[name] = json.loads(out.read_text())
    ref = results["megatron"]
    assert [r["assembly"] for r in ref["assemblies"]] == ["asm0", "asm1"]
    # 2 held-out contigs of 2,000 bases per assembly: every token but each document's first
    assert [r["tokens"] for r in ref["assemblies"]] == [2 * 1999, 2 * 1999]
    assert ref["total"]["loss"] < math.log(4) - 0.1  # it learned something of the chain
    for name in ("tp2", "pp2", "cp2", "hf"):
        for a, b in zip(results[name]["assemblies"], ref["assemblies"]):
            assert a["tokens"] == b["tokens"]
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"], (name, a, b)
    assert [s["species"] for s in ref["species"]] == ["species 0", "species 1"]


def test_loss_sample_is_deterministic_and_within_documents(env):
    from megatron_geno.evaluation.loss import corpus_windows

    windows, assemblies, parts = corpus_windows([str(env["corpus"])], "valid", 100, None)
    for w in windows:  # no window reaches past its document's last base (the EOD is not scored)
        part = parts[w.part]
        doc = int(np.searchsorted(part.doc_offsets, w.start, side="right")) - 1
        assert w.start + w.length <= part.doc_offsets[doc + 1] - 1
    assert sum(w.length - 1 for w in windows) == 4 * 1999
    a, _, _ = corpus_windows([str(env["corpus"])], "valid", 100, 5, seed=3)
    b, _, _ = corpus_windows([str(env["corpus"])], "valid", 100, 5, seed=3)
    assert a == b and len(a) == 5


def direct_scores(hf: Path, contigs: dict, rows: list[dict], window: int) -> list[float]:
    """log p(alt window) - log p(ref window) with transformers' MixtralForCausalLM, computed
    here from the test's own genome and the export's own tokenizer."""
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(hf))
    scores = []
    for row in rows:
        seq, p = contigs[row["chrom"]], int(row["pos"]) - 1
        start = p - window // 2
        ref = seq[start:start + window]
        alt = ref[:p - start] + row["alt"] + ref[p - start + 1:]
        total = []
        for text in (ref, alt):
            ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1)
            total.append(float(logp.gather(-1, ids[:, 1:, None]).sum()))
        scores.append(total[1] - total[0])
    return scores


def test_variant_scores_match_transformers_and_every_layout(env):
    outs = {}
    for name, args, nproc in (("hf", ["--hf", env["hf"]], 1),
                              ("tp2", ["--checkpoint", env["ckpt"], "--tensor-parallel", 2], 2),
                              ("pp2", ["--checkpoint", env["ckpt"], "--pipeline-parallel", 2], 2)):
        out = env["root"] / f"scores_{name}.tsv"
        proc = geno_eval("variants", *args, "--vcf", env["parity"], "--reference", env["ref"],
                         "--window", WINDOW, "--label-field", "CLNSIG", "--out", out,
                         nproc=nproc)
        assert "AUROC" in proc.stdout
        outs[name] = read_tsv(out)
    hf = outs["hf"]
    assert len(hf) == len(env["records"][::6]) and all(r["status"] == "ok" for r in hf)
    for name in ("tp2", "pp2"):
        diffs = []
        for a, b in zip(outs[name], hf):
            assert (a["chrom"], a["pos"], a["alt"]) == (b["chrom"], b["pos"], b["alt"])
            diffs.append(abs(float(a["score"]) - float(b["score"])))
        # the same to 1e-4, but for a near-tie between two experts' router scores that the
        # summation order tips over (rare: seen in development runs)
        assert np.median(diffs) < 1e-5 and max(diffs) < 0.1, (name, max(diffs))
        assert sum(d > 1e-4 for d in diffs) <= len(diffs) // 100, (name, sorted(diffs)[-10:])
    sample = hf[:: max(1, len(hf) // 20)]
    direct = direct_scores(env["hf"], env["contigs"], sample, WINDOW)
    for row, score in zip(sample, direct):  # the same model and arithmetic: no routing excuse
        assert abs(float(row["score"]) - score) <= 1e-4, (row, score)


def test_improbable_alleles_score_low(env):
    """AUROC > 0.8 against the chain's own truth, both strands averaged."""
    out = env["root"] / "both.tsv"
    proc = geno_eval("variants", "--hf", env["hf"], "--vcf", env["vcf"], "--reference", env["ref"],
                     "--window", WINDOW, "--both-strands", "--label-field", "CLNSIG",
                     "--out", out, "--json", env["root"] / "both.json")
    result = json.loads((env["root"] / "both.json").read_text())
    pathogenic = sum(1 for r in env["records"] if r[4] == 1)
    assert result["labelled"] == {"pathogenic": pathogenic,
                                  "benign": len(env["records"]) - pathogenic}
    assert pathogenic >= 20 and len(env["records"]) - pathogenic >= 20
    assert result["auroc"] > 0.8, proc.stdout


def test_records_that_cannot_be_scored_are_counted(env):
    seq = env["contigs"]["c0"]
    records = [("c0", 3, seq[2], "A" if seq[2] != "A" else "C", None),  # window before start
               ("c0", 500, "T" if seq[499] != "T" else "G", "A", None),  # REF mismatch
               ("c0", 600, seq[599], "<DEL>", None),  # symbolic
               ("c0", 700, seq[699], "C" if seq[699] != "C" else "G", 1),  # scored
               ("c0", 1999, seq[1998], "A" if seq[1998] != "A" else "C", None)]  # past the end
    vcf = env["root"] / "mixed.vcf"
    write_vcf(vcf, env["contigs"], records)
    out = env["root"] / "mixed.tsv"
    proc = geno_eval("variants", "--hf", env["hf"], "--vcf", vcf, "--reference", env["ref"],
                     "--window", WINDOW, "--out", out)
    statuses = [r["status"] for r in read_tsv(out)]
    assert statuses == ["past_contig_end", "ref_mismatch", "unsupported", "ok", "past_contig_end"]
    assert [r["score"] != "" for r in read_tsv(out)] == [False, False, False, True, False]
    assert "ok 1" in proc.stdout and "past_contig_end 2" in proc.stdout


def test_bad_input_is_one_line_and_exit_2(env, tmp_path):
    contigs, first = env["contigs"], env["records"][0]
    later = next(r for r in env["records"] if r[0] == first[0] and r[1] > first[1])
    unsorted = tmp_path / "unsorted.vcf"
    write_vcf(unsorted, contigs, [later, first])
    assert "not sorted" in error_line(geno_eval(
        "variants", "--hf", env["hf"], "--vcf", unsorted, "--reference", env["ref"],
        "--out", tmp_path / "o.tsv", check=False))
    missing = tmp_path / "missing.vcf"
    write_vcf(missing, {"chrZ": "A" * 100}, [("chrZ", 50, "A", "C", None)])
    assert "contig chrZ is not in the reference" in error_line(geno_eval(
        "variants", "--hf", env["hf"], "--vcf", missing, "--reference", env["ref"],
        "--out", tmp_path / "o.tsv", check=False))
    import pysam

    packed = tmp_path / "packed.vcf.gz"
    pysam.tabix_compress(str(env["parity"]), str(packed))  # bgzipped, never indexed
    assert "not indexed" in error_line(geno_eval(
        "variants", "--hf", env["hf"], "--vcf", packed, "--reference", env["ref"],
        "--out", tmp_path / "o.tsv", check=False))
    gzipped = tmp_path / "ref.fa.gz"  # plain gzip: htslib cannot index it
    gzipped.write_bytes(gzip.compress(Path(env["ref"]).read_bytes()))
    args = ("variants", "--hf", env["hf"], "--vcf", env["parity"], "--reference", gzipped,
            "--out", tmp_path / "o.tsv")
    proc = geno_eval(*args, check=False)
    assert "bgzip" in error_line(proc) and "[E::" not in proc.stderr, proc.stderr
    loud = geno_eval(*args, "--verbose", check=False)  # htslib's own lines on request
    assert "[E::fai_build3_core]" in loud.stderr and error_line(loud) == error_line(proc)
    pysam.tabix_index(str(packed), preset="vcf", force=True)  # indexed: read contig by contig
    geno_eval("variants", "--hf", env["hf"], "--vcf", packed, "--reference", env["ref"],
              "--window", WINDOW, "--out", tmp_path / "packed.tsv")
    assert len(read_tsv(tmp_path / "packed.tsv")) == len(env["records"][::6])
    not_mixtral = tmp_path / "llama"
    not_mixtral.mkdir()
    (not_mixtral / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "not a Mixtral export" in error_line(geno_eval(
        "loss", "--hf", not_mixtral, "--corpus", env["corpus"], check=False))
    assert "exactly one of --checkpoint" in error_line(geno_eval(
        "loss", "--hf", env["hf"], "--checkpoint", env["ckpt"], "--corpus", env["corpus"],
        check=False))
    assert not (tmp_path / "o.tsv").exists()


def test_embeddings_agree_across_forms_and_pool_as_stated(env, tmp_path):
    import torch
    from transformers import MixtralForCausalLM

    fasta = tmp_path / "seqs.fa"
    seqs = {"short": env["contigs"]["c3"][:50], "long": env["contigs"]["c4"][:300]}
    fasta.write_text("".join(f">{n}\n{s}\n" for n, s in seqs.items()))
    geno_eval("embed", "--hf", env["hf"], "--fasta", fasta, "--window", 128, "--layer", 1,
              "--out", tmp_path / "hf.npy")
    geno_eval("embed", "--checkpoint", env["ckpt"], "--tensor-parallel", 2, "--fasta", fasta,
              "--window", 128, "--layer", 1, "--out", tmp_path / "mc.zarr", nproc=2)
    hf = np.load(tmp_path / "hf.npy")
    assert hf.shape == (2, 2, 64)
    assert (tmp_path / "hf.names.txt").read_text().split() == ["short", "long"]
    import zarr

    group = zarr.open_group(str(tmp_path / "mc.zarr"), mode="r")
    assert group.attrs["names"] == ["short", "long"]
    np.testing.assert_allclose(group["mean"][:], hf[:, 0], atol=1e-4)
    np.testing.assert_allclose(group["last"][:], hf[:, 1], atol=1e-4)
    # context parallelism: each window's hidden states put back in order from 2 ranks
    geno_eval("embed", "--checkpoint", env["ckpt"], "--context-parallel", 2, "--fasta", fasta,
              "--window", 128, "--layer", 1, "--out", tmp_path / "cp.npy", nproc=2)
    np.testing.assert_allclose(np.load(tmp_path / "cp.npy"), hf, atol=1e-4)
    # the stated pooling, computed here: windows of 128 run alone, mean over all tokens
    model = MixtralForCausalLM.from_pretrained(str(env["hf"]), dtype=torch.float32).eval()
    ids = torch.tensor([[5 + BASES.index(b) for b in seqs["long"]]])
    with torch.no_grad():
        parts = [model.model(ids[:, k:k + 128], output_hidden_states=True).hidden_states[1][0]
                 for k in range(0, 300, 128)]
    states = torch.cat(parts)
    np.testing.assert_allclose(hf[1, 0], states.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(hf[1, 1], states[-1].numpy(), atol=1e-5)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    assert "exists" in error_line(geno_eval("embed", "--hf", env["hf"], "--fasta", fasta,
                                            "--out", tmp_path / "hf.npy", check=False))
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == before


def test_during_training_equals_geno_eval_on_the_saved_checkpoint(env, tmp_path):
    """eval.corpora / eval.variants at TP=2 score what geno-eval scores on the checkpoint saved
    at that step: the same windows, the same losses, the same AUROC."""
    records = geno_train(tmp_path / "run", f"checkpoint.load={env['ckpt']}",
                         "checkpoint.weights_only=true", "schedule.train_iters=2",
                         "schedule.eval_interval=2", "parallel.tensor_parallel=2",
                         f"eval.corpora=[{env['corpus']}]", "eval.window=128", "eval.windows=16",
                         f"eval.variants={env['parity']}", f"eval.reference={env['ref']}",
                         f"eval.variants_window={WINDOW}", "eval.label_field=CLNSIG",
                         f"checkpoint.save={tmp_path / 'ckpt'}", nproc=2)
    logged = records[-1]
    assert logged["step"] == 2 and "val_loss" in logged
    out = tmp_path / "loss.json"
    geno_eval("loss", "--checkpoint", tmp_path / "ckpt", "--corpus", env["corpus"], "--window",
              128, "--windows", 16, "--json", out)
    for row in json.loads(out.read_text())["assemblies"]:
        key = f"eval/loss/corpus/{row['assembly']}"
        assert abs(logged[key] - row["loss"]) <= 1e-4 * row["loss"], (key, logged[key], row)
    geno_eval("variants", "--checkpoint", tmp_path / "ckpt", "--vcf", env["parity"],
              "--reference", env["ref"], "--window", WINDOW, "--label-field", "CLNSIG",
              "--out", tmp_path / "v.tsv", "--json", tmp_path / "v.json")
    assert abs(logged["eval/variants_auroc"] - json.loads(
        (tmp_path / "v.json").read_text())["auroc"]) < 2e-3


def test_eval_settings_are_checked_before_training(env, tmp_path):
    from tests.functional.launcher import geno_train_error

    for overrides, expected in (
            ([f"eval.variants={env['vcf']}"], "eval.variants (a VCF) and eval.reference"),
            ([f"eval.variants={tmp_path / 'none.vcf'}", f"eval.reference={env['ref']}"],
             "none.vcf does not exist"),
            (["eval.corpora=[nowhere]"], "eval.corpora: nowhere/manifest.json does not exist")):
        code, stderr = geno_train_error(tmp_path / "run", "schedule.eval_interval=5", *overrides)
        lines = [line for line in stderr.splitlines() if line.startswith("geno-train: error:")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], stderr[-2000:]
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before the first step
