"""Training: the run lifecycle (new or resumed, lock, rank hand-off), the loop, one step, the
state it captures and restores, the schedule, and the distributed helpers."""
