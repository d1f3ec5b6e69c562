"""Which layers are compressed and at what ranks: a model's layers, their parameter and FLOP
accounting, the rank allocations (uniform, error-based), owner ranks, and the plan document.

Import the modules themselves: ``admm.planning.accounting``, ``allocate``, ``layer_info``, ``model_plan``,
``owners``, ``planner``, ``rank_plan``."""
