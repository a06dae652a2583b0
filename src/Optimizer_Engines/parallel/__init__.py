"""The parallel wing: engines that run in several processes (``blockwise``, ``async``, ``entire`` under torchrun) and
the asynchronous simulator (``async_sequential``). The core never imports it; the engine table names its modules."""
