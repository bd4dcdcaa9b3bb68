"""The LSST Data Butler: inputs from a Butler repository, outputs where fgcmcal reads them.

Optional: needs the ``streamstars[butler]`` extra (``lsst-daf-butler``, pure Python, no afw).
Nothing here imports ``lsst.daf.butler`` at module import time; every entry point goes through
:func:`streamstars.butler.repo.require_butler`, which says how to install the extra.

One concept per module:

* :mod:`~streamstars.butler.repo` -- the import guard, opening a repository, checking
  collections and dataset types;
* :mod:`~streamstars.butler.discover` -- the datasets of each visit in a collection search path
  (``sourceTable_visit`` + ``visitSummary`` or ``visitTable``/``ccdVisitTable``);
* :mod:`~streamstars.butler.read` -- reading datasets through their URIs (local or remote
  datastores), preparing a visit, the reference catalog's ``cal_ref_cat`` shards;
* :mod:`~streamstars.butler.watch` -- polling for new datasets and publishing visit events;
* :mod:`~streamstars.butler.snapshot` -- ingesting a snapshot as the datasets of fgcmcal's fit
  cycle;
* :mod:`~streamstars.butler.simulate` -- writing a simulated survey as a repository.

See ``docs/butler.md``.
"""
