"""An example of user code for gradlake: a surrogate and a task named by import path.

jobs/byo-model.toml puts ``examples/`` on ``python_path`` and names
``byo_surrogate.model:ResidualConvNet`` and ``byo_surrogate.task:RelativeL2Task``.
"""
