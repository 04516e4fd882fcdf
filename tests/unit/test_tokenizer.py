import numpy as np
import pytest

from megatron_geno.tokenizer import (
    BOS, EOD, MASK, PAD, UNK, VOCAB, VOCAB_SIZE, GenoTokenizer, encoding_table,
)


def test_vocabulary_is_fixed():
    assert VOCAB_SIZE == 128
    assert VOCAB[:15] == ["<pad>", "<eod>", "<bos>", "<mask>", "<unk>", "A", "C", "G", "T", "N",
                          "a", "c", "g", "t", "n"]
    assert (PAD, EOD, BOS, MASK, UNK) == (0, 1, 2, 3, 4)
    assert VOCAB[15] == "<tag_0>" and VOCAB[-1] == "<tag_112>"


def test_uppercase_policy_folds_soft_masking_and_iupac():
    tok = GenoTokenizer("upper")
    assert tok.tokenize("ACGTN").tolist() == [5, 6, 7, 8, 9]
    assert tok.tokenize("acgtn").tolist() == [5, 6, 7, 8, 9]
    assert tok.tokenize("RYKMSWBDHVryk").tolist() == [9] * 13
    assert tok.tokenize("AX-").tolist() == [5, UNK, UNK]


def test_keep_policy_keeps_soft_masking():
    tok = GenoTokenizer("keep")
    assert tok.tokenize("AcgTn").tolist() == [5, 11, 12, 8, 14]
    assert tok.tokenize("r").tolist() == [14]
    assert tok.detokenize(tok.tokenize("ACgtN")) == "ACgtN"


def test_detokenize_skips_special_tokens():
    tok = GenoTokenizer()
    assert tok.detokenize(np.array([BOS, 5, 6, EOD, 7, 20])) == "ACG"


def test_megatron_interface():
    from megatron.core.tokenizers import MegatronTokenizerBase

    tok = GenoTokenizer()
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.vocab_size == 128 and tok.eod == EOD and tok.pad == PAD
    assert tok.vocab["G"] == 7 and tok.inv_vocab[8] == "T"


def test_bad_policy():
    with pytest.raises(ValueError, match="soft_mask"):
        encoding_table("lower")


def test_training_tokenizer_from_an_hf_directory_equals_the_builtin(tmp_path):
    """data.tokenizer=<HF dir>: the adapter geno-train builds gives the built-in ids, EOD and
    vocabulary size, so an imported model continues on the same token stream."""
    from checkpoint_tools.hf_tokenizer import write_hf_tokenizer
    from megatron_geno.tokenizer import GenoTokenizer, build_tokenizer

    write_hf_tokenizer(tmp_path, "keep")
    adapter, builtin = build_tokenizer(str(tmp_path)), build_tokenizer("geno:keep")
    text = "ACGTNacgtnRY"
    assert adapter.tokenize(text).tolist() == builtin.tokenize(text).tolist()
    assert adapter.eod == builtin.eod and adapter.vocab_size == builtin.vocab_size == 128
    assert adapter.detokenize(builtin.tokenize("ACGTacgt")) == "ACGTacgt"
    assert isinstance(build_tokenizer("geno"), GenoTokenizer)


def test_a_checkpoints_tokenizer_and_soft_mask_policy(tmp_path):
    """Read from the iteration directory's config.yaml (as geno-train and from-hf write it), the
    one reader geno-convert to-hf and geno-eval share."""
    from megatron_geno.checkpointing import saved_tokenizer
    from megatron_geno.tokenizer import soft_mask_of_spec

    ckpt = tmp_path / "iter_0000004"
    ckpt.mkdir()
    assert saved_tokenizer(ckpt) == "geno" and soft_mask_of_spec("geno") == "upper"
    (ckpt / "config.yaml").write_text("data:\n  tokenizer: geno:keep\n")
    assert saved_tokenizer(ckpt) == "geno:keep" and soft_mask_of_spec("geno:keep") == "keep"
    assert soft_mask_of_spec("/some/hf/tokenizer") == "upper"


def test_an_hf_exports_soft_mask_policy_one_reader(tmp_path):
    """geno-convert from-hf and geno-eval read the policy to-hf wrote with one reader, which
    names the file when it is damaged or names a policy that is not ours."""
    import json

    import pytest

    from checkpoint_tools.hf_tokenizer import write_hf_tokenizer
    from megatron_geno.tokenizer import read_hf_soft_mask

    assert read_hf_soft_mask(tmp_path) is None  # no tokenizer_config.json: not ours
    for policy in ("upper", "keep"):
        write_hf_tokenizer(tmp_path, policy)
        assert read_hf_soft_mask(tmp_path) == policy
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    assert read_hf_soft_mask(tmp_path) is None  # another project's tokenizer
    for text, message in (("{not json", "is not readable JSON"), ("[1, 2]", "is not a JSON object"),
                          ('{"geno_soft_mask": "lower"}', "geno_soft_mask='lower' is not one of")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            read_hf_soft_mask(tmp_path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("policy,text,decoded", [
    ("upper", "ACGTNNACGT", "ACGTNNACGT"),
    ("upper", "acgtRY", "ACGTNN"),  # folded and IUPAC-mapped on the way in
    ("keep", "ACgtnNac", "ACgtnNac"),
])
def test_the_hf_tokenizer_decodes_what_it_encodes(tmp_path, policy, text, decoded):
    """An export's tokenizer gives back the bases, not 'A C G T' (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer

    from checkpoint_tools.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer(tmp_path, policy)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(GenoTokenizer(policy).tokenize(decoded))
    assert tokenizer.decode(ids) == decoded
