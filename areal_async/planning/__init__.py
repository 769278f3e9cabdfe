"""Planning without running: where each actor goes (placement), what each GPU holds by phase (memory plan), and
the discrete-event model of the whole system with its inputs from the benchmarks' reports (simulate)."""
