"""From a trained student to a deployed model: ONNX and int8 export (`onnx_export`), the agreement of the
exported model with the PyTorch student on dev (`agreement`), measured size and latency (`bench`), and the
run -> model/trial plumbing they share (`source`). Needs the optional extra `kdplatform[onnx]`.
"""
