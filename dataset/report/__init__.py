"""``serialgen report``: a static HTML page (one folder: ``index.html`` and ``img/``) about a rendered
shard set or an asset folder, to look at a dataset without writing code.

* :mod:`.shards_report`: a shard folder (run settings, counts, distributions, failures, character cards);
* :mod:`.assets_report`: an asset folder (accepted / rejected by reason, the pose library's coverage);
* :mod:`.page`: the folder writer (escaping, atomic swap); :mod:`.plots`: the matplotlib charts;
* :mod:`.browser`: load a page in headless Chromium and check it (the tests, the docs images);
* :mod:`.cli`: the command.
"""
