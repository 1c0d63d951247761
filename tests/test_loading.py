

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


def test_threads_loading_at_once_each_get_their_model():
    """transformers builds a text encoder under a process-wide default device: threads loading at once saw each
    other's ("Unsupported device type 'meta'", met by WorldBench's baselines); loads now take turns."""
    import threading

    from diffprobe import loading
    from diffprobe.mini import packaged_path

    loaded, errors = [], []

    def load():
        try:
            loaded.append(loading.load_backbone({"name": "mini", "path": str(packaged_path())}))
        except Exception as exc:          # the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(loaded) == 3
    assert all(not p.is_meta for bb in loaded for p in bb.text_encoder.parameters())
