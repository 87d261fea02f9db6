// A 3D US source written against the reference C++ OpenIGTLink library (Debian's
// libopenigtlink-dev 1.11), to check that the fusion service speaks the protocol as Slicer
// and PLUS do, not only as pyigtl does.
//
// usage: igtl_us_client HOST PORT RAW NI NJ NK SI SJ SK TX TY TZ SX SY SZ NX NY NZ CX CY CZ
//   RAW: uint8 voxels, i fastest; spacing; the i, j, k axis directions (RAS); the image
//   centre (RAS), as the IMAGE header carries them.
// Sends one IMAGE ("US") and prints every answer as one JSON line until the service's
// report (STRING "DeepNavReport") or an error STATUS arrives.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "igtlClientSocket.h"
#include "igtlImageMessage.h"
#include "igtlMessageHeader.h"
#include "igtlOSUtil.h"
#include "igtlStatusMessage.h"
#include "igtlStringMessage.h"
#include "igtlTransformMessage.h"

static std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') { out += "\\n"; continue; }
    out += c;
  }
  return out;
}

template <typename T>
static double sum_voxels(void* data, long n) {
  double s = 0.0;
  T* p = static_cast<T*>(data);
  for (long i = 0; i < n; ++i) s += static_cast<double>(p[i]);
  return s;
}

static void print_image(igtl::MessageHeader::Pointer header, igtl::ClientSocket::Pointer socket) {
  igtl::ImageMessage::Pointer msg = igtl::ImageMessage::New();
  msg->SetMessageHeader(header);
  msg->AllocatePack();
  socket->Receive(msg->GetPackBodyPointer(), msg->GetPackBodySize());
  int crc_ok = (msg->Unpack(1) & igtl::MessageHeader::UNPACK_BODY) ? 1 : 0;
  int size[3]; float spacing[3]; float origin[3]; float normals[3][3];
  msg->GetDimensions(size);
  msg->GetSpacing(spacing);
  msg->GetOrigin(origin);
  msg->GetNormals(normals);
  long n = (long)size[0] * size[1] * size[2] * msg->GetNumComponents();
  double sum = 0.0;
  if (msg->GetScalarType() == igtl::ImageMessage::TYPE_UINT8) sum = sum_voxels<unsigned char>(msg->GetScalarPointer(), n);
  else if (msg->GetScalarType() == igtl::ImageMessage::TYPE_FLOAT32) sum = sum_voxels<float>(msg->GetScalarPointer(), n);
  std::printf("{\"type\": \"IMAGE\", \"device\": \"%s\", \"crc_ok\": %d, \"size\": [%d, %d, %d], "
              "\"components\": %d, \"scalar_type\": %d, \"coordinate\": %d, \"endian\": %d, "
              "\"spacing\": [%.7g, %.7g, %.7g], \"centre\": [%.7g, %.7g, %.7g], \"normals\": "
              "[[%.7g, %.7g, %.7g], [%.7g, %.7g, %.7g], [%.7g, %.7g, %.7g]], \"sum\": %.17g}\n",
              msg->GetDeviceName(), crc_ok, size[0], size[1], size[2], msg->GetNumComponents(),
              msg->GetScalarType(), msg->GetCoordinateSystem(), msg->GetEndian(), spacing[0], spacing[1],
              spacing[2], origin[0], origin[1], origin[2], normals[0][0], normals[1][0], normals[2][0],
              normals[0][1], normals[1][1], normals[2][1], normals[0][2], normals[1][2], normals[2][2], sum);
}

int main(int argc, char* argv[]) {
  if (argc != 22) {
    std::fprintf(stderr, "usage: %s HOST PORT RAW NI NJ NK SI SJ SK TX TY TZ SX SY SZ NX NY NZ CX CY CZ\n", argv[0]);
    return 2;
  }
  int size[3] = {std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6])};
  float v[15];
  for (int i = 0; i < 15; ++i) v[i] = static_cast<float>(std::atof(argv[7 + i]));

  igtl::ImageMessage::Pointer image = igtl::ImageMessage::New();
  image->SetDimensions(size);
  image->SetSpacing(v[0], v[1], v[2]);
  image->SetScalarTypeToUint8();
  image->SetCoordinateSystem(igtl::ImageMessage::COORDINATE_RAS);
  image->SetDeviceName("US");
  float t[3] = {v[3], v[4], v[5]}, s[3] = {v[6], v[7], v[8]}, nrm[3] = {v[9], v[10], v[11]};
  image->SetNormals(t, s, nrm);
  image->SetOrigin(v[12], v[13], v[14]);  // the protocol's "origin" is the image centre
  image->AllocateScalars();
  std::ifstream raw(argv[3], std::ios::binary);
  raw.read(static_cast<char*>(image->GetScalarPointer()), image->GetImageSize());
  if (!raw) { std::fprintf(stderr, "cannot read %d bytes from %s\n", image->GetImageSize(), argv[3]); return 2; }
  igtl::TimeStamp::Pointer ts = igtl::TimeStamp::New();
  ts->GetTime();
  image->SetTimeStamp(ts);
  image->Pack();

  igtl::ClientSocket::Pointer socket = igtl::ClientSocket::New();
  if (socket->ConnectToServer(argv[1], std::atoi(argv[2])) != 0) { std::fprintf(stderr, "cannot connect\n"); return 3; }
  socket->SetReceiveTimeout(60000);
  socket->Send(image->GetPackPointer(), image->GetPackSize());

  for (int messages = 0; messages < 20; ++messages) {
    igtl::MessageHeader::Pointer header = igtl::MessageHeader::New();
    header->InitPack();
    if (socket->Receive(header->GetPackPointer(), header->GetPackSize()) != header->GetPackSize()) {
      std::fprintf(stderr, "connection closed\n");
      return 4;
    }
    header->Unpack();
    std::string type = header->GetDeviceType();
    if (type == "IMAGE") {
      print_image(header, socket);
    } else if (type == "TRANSFORM") {
      igtl::TransformMessage::Pointer msg = igtl::TransformMessage::New();
      msg->SetMessageHeader(header);
      msg->AllocatePack();
      socket->Receive(msg->GetPackBodyPointer(), msg->GetPackBodySize());
      int crc_ok = (msg->Unpack(1) & igtl::MessageHeader::UNPACK_BODY) ? 1 : 0;
      igtl::Matrix4x4 m;
      msg->GetMatrix(m);
      std::printf("{\"type\": \"TRANSFORM\", \"device\": \"%s\", \"crc_ok\": %d, \"matrix\": [", msg->GetDeviceName(), crc_ok);
      for (int r = 0; r < 4; ++r)
        std::printf("[%.7g, %.7g, %.7g, %.7g]%s", m[r][0], m[r][1], m[r][2], m[r][3], r < 3 ? ", " : "");
      std::printf("]}\n");
    } else if (type == "STRING") {
      igtl::StringMessage::Pointer msg = igtl::StringMessage::New();
      msg->SetMessageHeader(header);
      msg->AllocatePack();
      socket->Receive(msg->GetPackBodyPointer(), msg->GetPackBodySize());
      int crc_ok = (msg->Unpack(1) & igtl::MessageHeader::UNPACK_BODY) ? 1 : 0;
      std::printf("{\"type\": \"STRING\", \"device\": \"%s\", \"crc_ok\": %d, \"string\": \"%s\"}\n",
                  msg->GetDeviceName(), crc_ok, escape(msg->GetString()).c_str());
      if (std::string(msg->GetDeviceName()) == "DeepNavReport") return 0;
    } else if (type == "STATUS") {
      igtl::StatusMessage::Pointer msg = igtl::StatusMessage::New();
      msg->SetMessageHeader(header);
      msg->AllocatePack();
      socket->Receive(msg->GetPackBodyPointer(), msg->GetPackBodySize());
      int crc_ok = (msg->Unpack(1) & igtl::MessageHeader::UNPACK_BODY) ? 1 : 0;
      std::printf("{\"type\": \"STATUS\", \"device\": \"%s\", \"crc_ok\": %d, \"code\": %d, \"text\": \"%s\"}\n",
                  msg->GetDeviceName(), crc_ok, msg->GetCode(), escape(msg->GetStatusString()).c_str());
      return 0;
    } else {
      socket->Skip(header->GetBodySizeToRead(), 0);
    }
    std::fflush(stdout);
  }
  return 0;
}
