

def test_a_half_dtype_on_a_cpu_without_its_instructions_is_warned_about(monkeypatch, caplog):
    """On a CPU whose oneDNN has no bfloat16 kernels, loading in bfloat16 says once to use float32; float32, and
    bfloat16 where the CPU has them, say nothing; a GPU is never warned about."""
    import logging

    import torch

    from diffprobe import loading

    assert not loading.half_is_slow(torch.device("cuda"), torch.bfloat16)
    assert not loading.half_is_slow(torch.device("cpu"), torch.float32)
    for supported in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda s=supported: s)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffprobe.loading"):
            loading.load_backbone({"name": "tiny", "tiny": "sd15"}, dtype="bfloat16")
        warned = [r for r in caplog.records if "use dtype=float32" in r.getMessage()]
        assert len(warned) == (0 if supported else 1)
