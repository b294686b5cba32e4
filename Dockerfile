# A slim, non-root image of the proxy alone (not the dev stack).
#   docker build -t mongoproxy .
#   docker run --rm -p 27016:27016 -p 9216:9216 -v $PWD/config:/etc/mongoproxy:ro \
#       mongoproxy run --config /etc/mongoproxy/proxy.yaml
# The config must listen on 0.0.0.0 inside the container (see config/docker.yaml).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home mongoproxy
COPY --from=build /install /usr/local
COPY config/docker.yaml /etc/mongoproxy/proxy.yaml
USER mongoproxy
EXPOSE 27016 9216
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9216/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["mongoproxy"]
CMD ["run", "--config", "/etc/mongoproxy/proxy.yaml"]
