"""Ascend lowering (torch_npu ops and their CPU emulation). Planned in the Ascend lowering issue;
nothing here imports torch_npu: it is optional and detected at run time (ptqc.device)."""
