# The worker's image: the wheel built from this checkout and installed with its pinned
# dependencies by deploy/wheel.sh, the same steps tests/integration/test_wheel.py runs
# (as a non-root user, into a clean virtualenv, then migrate, run, a release, doctor).
#
#   docker build -t cart-release-worker:0.1.0 .
#   docker run --env-file worker.env cart-release-worker:0.1.0            # release-worker run
#   docker run --env-file owner.env  cart-release-worker:0.1.0 migrate    # one-shot job
#   docker run ... cart-release-worker:0.1.0 api                          # the HTTP front door
#
# No container runtime exists on the machines this project is developed on: this file was
# not built there (README: Deploying). Every dependency installs from a binary wheel, so
# neither stage needs a compiler, and the final stage has none (the slim image ships none).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m pip install --no-cache-dir --disable-pip-version-check build==1.6.1
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY migrations/ migrations/
COPY deploy/wheel.sh deploy/wheel.sh
RUN PYTHON=python deploy/wheel.sh build /src /dist \
 && PIP_NO_CACHE_DIR=1 PYTHON=python deploy/wheel.sh install /opt/release-worker /dist/cart_release_worker-*.whl

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin worker
COPY --from=build /opt/release-worker /opt/release-worker
ENV PATH=/opt/release-worker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WORKER_METRICS_HOST=0.0.0.0 \
    WORKER_API_HOST=0.0.0.0 \
    WORKER_LOG_FORMAT=json
USER 10001:10001
# /metrics, /healthz, /readyz of `run`; the `api` command's port.
EXPOSE 9400 8080
ENTRYPOINT ["release-worker"]
CMD ["run"]
