"""What a process needs around the method: start-up (`initialize`), the CPU compatibility layer
for megatron-core (`cpu_compat`) and the CPU-only speed-ups (`cpu_speedups`), stop conditions
every rank agrees on (`stopping`), fault injection for crash tests (`faults`), the command-line
helpers (`cli`), library warnings (`console`) and spawned multi-process runs (`testing`)."""
