"""The parts of benchmarks/gpu_check.py: cases.py (what each case runs in each mode), model.py (the
original-layout checkpoint and the data), run.py (processes, the probe's records, what runs left
behind), case.py (one case, start to row), report.py (the rules and the table), check.py (the whole
check). The probe itself is ../gpu_check_probe/sitecustomize.py."""
