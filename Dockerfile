# sg-jobs: API and worker share this image; docker-compose.yml picks the command.
# Bookworm is pinned because its package names (libglib2.0-0) are the ones used below.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The lock has opencv-python-headless (no libGL needed); glib is kept because some opencv wheels
# link libgthread, and it is small.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sgjobs

# Dependencies first, so editing the source does not reinstall torch. --no-deps: the lock is the
# complete, tested set; super-gradients 3.7.1's own pins cannot be satisfied on a current torch.
# torch in the lock is the default PyPI build (CUDA-capable), so the lock also lists its nvidia-* wheels.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock

# No build isolation: the build backend (setuptools<81) is already installed from the lock.
COPY . ./
RUN pip install --no-deps --no-build-isolation . \
    && sgjobs --help > /dev/null

# A fixed non-root user; /data is created here, owned by it, so a fresh named volume mounted on
# /data inherits that ownership.
RUN useradd --create-home --uid 1000 sgjobs \
    && mkdir -p /data/datasets /data/jobs \
    && chown -R sgjobs:sgjobs /data
USER sgjobs

# super-gradients writes its console log under SUPER_GRADIENTS_LOG_DIR at import time (default ~/sg_logs)
# and installs a crash handler around sys.excepthook unless CRASH_HANDLER=FALSE.
ENV SGJOBS_HOME=/data \
    SGJOBS_DATASETS_DIR=/data/datasets \
    SUPER_GRADIENTS_LOG_DIR=/data/sg_logs \
    CRASH_HANDLER=FALSE \
    NO_ALBUMENTATIONS_UPDATE=1

VOLUME ["/data"]
EXPOSE 8000

# Everything in one container (migrate, API, worker); docker-compose.yml runs them separately.
CMD ["sgjobs", "serve", "--host", "0.0.0.0", "--port", "8000"]
