// The official Node tus server with its file store, as the anchor of chunked uploads.
//   node tus_server.mjs <port> <directory>
import http from 'node:http';
import { Server } from '@tus/server';
import { FileStore } from '@tus/file-store';

const port = Number(process.argv[2] || 1080);
const directory = process.argv[3] || '/tmp/tus-files';
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) });
const server = http.createServer((req, res) => tus.handle(req, res));
server.keepAliveTimeout = 65000;
server.requestTimeout = 0;
server.listen(port, '127.0.0.1', () => console.log(`tus listening ${port}`));
