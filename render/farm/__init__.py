"""The render farm: Blender workers on Ray that turn an asset folder into WebDataset shards.

* :mod:`~serialgen.render.farm.driver`: ``FarmConfig``, planning jobs, ``run_farm`` (the driver
  process: no ``bpy``), writing ``index.json``;
* :mod:`~serialgen.render.farm.pool`: worker processes (``FarmWorker``), the Ray actor pool
  (``RayPool``) and the in-process pool (``LocalPool``), the code fingerprint;
* :mod:`~serialgen.render.farm.schedule`: the job book (affinity, retries, quarantine, timeouts);
* :mod:`~serialgen.render.farm.journal`: what a run folder holds (``run.json``, the journal), resume;
* :mod:`~serialgen.render.farm.report`: progress bar, per-worker statistics, the printed summary;
* :mod:`~serialgen.render.farm.gpu`: Cycles device selection for the Ray-assigned GPU;
* :mod:`~serialgen.render.farm.faults`: fault injection for the farm's tests.

What one worker does with one job is :mod:`serialgen.render.job`.
"""
