"""The job the benchmarks enqueue (never executed)."""


def noop(*args: object) -> None:
    return None
